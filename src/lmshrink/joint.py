"""Joint factorization (``Plan.joint``): the linears that read one input (q/k/v; gate/up) are factorized together,
with one rank-k right factor (the input-side basis) shared by all of them and a left factor each.

Stacked, [W_q; W_k; W_v] ~ [L_q; L_k; L_v] R stores k (in + sum out) values instead of sum k_i (in + out_i): the
input side is paid once. Every low-rank method applies unchanged to the stacked matrix, because the members read
one tensor: their input statistics are one; row-side statistics (the Fisher) stack; output-side Grams (kfac) join
block-diagonally (what couples two members' output gradients is not measured).

A group is found by running the model (or one block) once with a pre-hook on each target: the linears handed the
same tensor object form a group, in call order. Nothing about an architecture's attribute names is assumed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from lmshrink.plan import Target, place_groups

ROW_STATS = {"fisher"}  # (out, in): one row per output, so members' rows stack
OUTPUT_GRAM_STATS = {"output_grad_gram"}  # (out, out): members' blocks on the diagonal


@dataclass
class JointTarget(Target):
    """Linears that read one input, factorized as one stacked matrix (out = the members' outs summed, in)."""

    members: list[Target] = field(default_factory=list)

    def weight(self) -> torch.Tensor:
        return torch.cat([member.weight() for member in self.members])

    @property
    def shape(self) -> tuple[int, int]:
        return sum(m.shape[0] for m in self.members), self.members[0].shape[1]


def call_order_groups(module: nn.Module, names: list[str], run: Callable[[], object]) -> list[list[str]]:
    """``names`` (submodules of ``module``) grouped by the input tensor they are handed when ``run()`` makes one
    forward pass, groups and members in call order; names never called are in no group."""
    order: list[tuple[str, torch.Tensor]] = []  # the tensors themselves: kept alive, so no address is reused

    def hook(name):
        def record(_, args):
            order.append((name, args[0]))

        return record

    handles = [module.get_submodule(name).register_forward_pre_hook(hook(name)) for name in names]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    groups: list[tuple[torch.Tensor, list[str]]] = []
    for name, tensor in order:
        group = next((members for seen, members in groups if seen is tensor), None)
        if group is None:
            groups.append((tensor, [name]))
        elif name not in group:
            group.append(name)
    return [members for _, members in groups]


def joint_targets(targets: list[Target], groups: list[list[str]]) -> list[Target]:
    """``targets`` with every group of two or more linears of one input width replaced by a JointTarget, placed where
    its first member was. Members must be plain linears (no embedding, no tied head)."""
    by_name = {t.name: t for t in targets}
    joined: dict[str, JointTarget] = {}
    for group in groups:
        members = [by_name[name] for name in group if name in by_name and by_name[name].kind == "linear"
                   and by_name[name].tied_head is None]
        if len(members) > 1 and len({m.shape[1] for m in members}) == 1:
            joint = JointTarget("+".join(m.name for m in members), members[0].module, "linear", members[0].group, None, members)
            for member in members:
                joined[member.name] = joint
    return place_groups(targets, joined)


def model_groups(loaded, targets: list[Target]) -> list[list[str]]:
    """The input groups of ``targets`` in a whole model: one short forward pass (eight tokens) finds them."""
    ids = torch.arange(8)[None] % max(2, int(getattr(loaded.model.config, "vocab_size", 8) or 8))
    return call_order_groups(loaded.model, [t.name for t in targets], lambda: loaded.logits(ids))


def merged_stats(target: Target, stats: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The statistics of ``target`` (a JointTarget: its members' merged; any other target: its own)."""
    if not isinstance(target, JointTarget):
        return stats.get(target.name, {})
    entries = [stats.get(member.name, {}) for member in target.members]
    merged = {}
    for key, value in entries[0].items():
        if key in ROW_STATS:
            merged[key] = torch.cat([entry[key] for entry in entries])
        elif key in OUTPUT_GRAM_STATS:
            merged[key] = torch.block_diag(*[entry[key] for entry in entries])
        else:  # input-side: the members read one tensor
            merged[key] = value
    return merged


def split_rows(target: JointTarget, left: torch.Tensor) -> list[torch.Tensor]:
    """The stacked left factor cut into the members' left factors."""
    return list(torch.split(left, [member.shape[0] for member in target.members]))
