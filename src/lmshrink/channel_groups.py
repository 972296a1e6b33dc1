"""Channel groups: the linears of one MLP, whose hidden channels can be removed together (lmshrink.methods.nystrom).

An MLP's producers (gate and up, or one fc1) make D hidden channels elementwise, and its consumer (down, fc2) reads
them: removing channel c removes row c of every producer and column c of the consumer, and nothing else changes. The
groups are found by the module names the common MLPs use, under one parent module; shapes are checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lmshrink.errors import InvalidArgument
from lmshrink.plan import Target, place_groups

# (producer names, consumer name) under one parent: LLaMA/Gemma/Mistral/Qwen; GPT-NeoX/OPT/Phi; Mixtral's experts.
MLP_LAYOUTS = ((("gate_proj", "up_proj"), "down_proj"), (("fc1",), "fc2"), (("w1", "w3"), "w2"),
               (("dense_h_to_4h",), "dense_4h_to_h"))


@dataclass
class ChannelTarget(Target):
    """The producers and the consumer of one MLP's hidden channels; ``shape`` is (channels, model width)."""

    producers: list[Target] = field(default_factory=list)
    consumer: Target | None = None

    @property
    def members(self) -> list[Target]:
        return [*self.producers, self.consumer]

    def weight(self) -> torch.Tensor:
        return self.consumer.weight().T

    @property
    def shape(self) -> tuple[int, int]:
        return self.consumer.shape[1], self.consumer.shape[0]


def channel_targets(targets: list[Target]) -> list[Target]:
    """``targets`` with every complete MLP (all its producers and its consumer targeted, plain linears of agreeing
    shapes) replaced by one ChannelTarget; an InvalidArgument naming --targets when none is complete."""
    by_name = {t.name: t for t in targets if t.kind == "linear" and t.tied_head is None}
    grouped: dict[str, ChannelTarget] = {}
    for target in targets:
        parent, _, leaf = target.name.rpartition(".")
        for producer_names, consumer_name in MLP_LAYOUTS:
            if leaf != consumer_name:
                continue
            producers = [by_name.get(f"{parent}.{name}" if parent else name) for name in producer_names]
            consumer = by_name.get(target.name)
            if consumer is None or any(p is None for p in producers):
                continue
            channels = consumer.shape[1]
            if any(p.shape != (channels, consumer.shape[0]) for p in producers):
                continue
            group = ChannelTarget(parent or "mlp", consumer.module, "channels",
                                  consumer.group, None, producers, consumer)
            for member in group.members:
                grouped[member.name] = group
    if not grouped:
        raise InvalidArgument("--targets", "no MLP is targeted whole (its producers, e.g. gate_proj and up_proj, and its "
                              "consumer, e.g. down_proj)", "--targets mlp (or linears) on a model with such MLPs")
    return place_groups(targets, grouped)
