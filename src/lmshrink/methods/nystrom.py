"""Nystrom channel selection for MLPs: keep a share of each MLP's hidden channels, and refit its down projection so
that the kept channels also stand in for the dropped ones (lmshrink.decompose.channels; MoDeGPT's MLP step, with the
channels chosen by backward elimination on the refitted output error instead of ridge leverage scores).

One MLP is one target (lmshrink.channel_groups): its producers lose rows, its consumer loses columns, so the MLP keeps
exactly the share of its parameters that it keeps of its channels, and runs as smaller dense matmuls. The output
error is weighted by the output-gradient Gram (K-FAC: loss units), so with ``--allocation sensitivity`` one budget
is spent across MLPs where dropping channels costs the least loss (each MLP within +-max_shift of the uniform
share). Linears outside a complete MLP stay dense; compress them with another method in a recipe stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lmshrink.accounting import stays_dense
from lmshrink.bounds import Bounds
from lmshrink.channel_groups import ChannelTarget, channel_targets
from lmshrink.errors import InvalidArgument
from lmshrink.methods import MethodOptions, option, register_method

ALLOCATIONS = ("uniform", "sensitivity")


@dataclass(frozen=True)
class NystromOptions(MethodOptions):
    channel_damping: float = option(1e-4, "ridge added to the hidden channels' Gram, as a fraction of its mean diagonal "
                                    "(pulls the refitted down projection toward the plain pruned columns)",
                                    bounds=Bounds(0, 1000, low_open=True))


def channel_budget(plan, groups: list[ChannelTarget]) -> list[tuple[int, int, int]]:
    """(fewest, uniform, most) channels each MLP keeps: --ratio R keeps round(R x channels), at least one; a
    sensitivity allocation may move it within +-max_shift of that (uniform: no room)."""
    if plan.ratio is None:
        raise InvalidArgument("--ratio", "nystrom keeps a share of each MLP's channels, so it needs a ratio",
                              "--ratio R or --params N with --method nystrom (not --rank or --energy)")
    if plan.allocation not in ALLOCATIONS:
        raise InvalidArgument("--allocation", f"{plan.allocation!r} is not an allocation nystrom has", ", ".join(ALLOCATIONS))
    shift = (plan.max_shift if plan.max_shift is not None else math.inf) if plan.allocation == "sensitivity" else 0.0
    bounds = []
    for group in groups:
        channels = group.shape[0]
        uniform = max(1, min(channels, round(plan.ratio * channels)))
        bounds.append((max(1, math.ceil(uniform * (1 - shift))) if shift < 1 else 1, uniform,
                       min(channels, math.floor(uniform * (1 + shift))) if shift < math.inf else channels))
    return bounds


def allocate_channels(rises: list[torch.Tensor], costs: list[int], bounds: list[tuple[int, int, int]],
                      channels: list[int]) -> list[int]:
    """Channels each group keeps: every group drops down to its ``most``; then, globally, the drops of the least loss
    per parameter saved (``rises`` per step, made non-decreasing) until as many parameters are saved as the uniform
    share saves, each group stopping at its ``fewest``."""
    goal = sum((count - uniform) * cost for count, (_, uniform, _), cost in zip(channels, bounds, costs))
    removed = [count - most for count, (_, _, most) in zip(channels, bounds)]
    saved = sum(r * cost for r, cost in zip(removed, costs))
    candidates = []
    for index, (rise, count, (fewest, _, _), cost) in enumerate(zip(rises, channels, bounds, costs)):
        steps = torch.cummax(rise, 0).values[removed[index]: count - fewest] / cost
        candidates += [(float(value), index) for value in steps]
    for _, index in sorted(candidates):  # per group, in its own elimination order (non-decreasing)
        if saved + costs[index] > goal:
            continue
        removed[index] += 1
        saved += costs[index]
    return [count - r for count, r in zip(channels, removed)]


def _weighted_consumer(group: ChannelTarget, stats: dict) -> torch.Tensor:
    """L^T W with L L^T the consumer's output-gradient Gram (identity without one): rises in loss units."""
    from lmshrink.decompose.weighted import psd_sqrt

    consumer = group.consumer.weight().detach().double()
    grad_gram = stats.get("output_grad_gram")
    if grad_gram is None:
        return consumer
    root, _ = psd_sqrt(grad_gram.to(consumer.device), 1e-6)
    return root.T @ consumer


@register_method("nystrom", kind="module", needs=("input_gram", "output_grad_gram"), options=NystromOptions,
                 target_kinds=("linear",), group_targets=channel_targets,
                 summary="MLP channel selection with a least-squares refit of the down projection (Nystrom)")
def nystrom(targets, plan, stats, options: NystromOptions):
    from lmshrink.decompose.channels import elimination_order, kept_after, refit_consumer
    from lmshrink.layers.channels import ChannelLinear

    groups = [t for t in targets if isinstance(t, ChannelTarget)]
    bounds = channel_budget(plan, groups)
    channels = [g.shape[0] for g in groups]
    orders, rises = [], []
    for group, count, (fewest, _, _) in zip(groups, channels, bounds):
        entry = stats.get(group.consumer.name, {})
        if "input_gram" not in entry:
            raise InvalidArgument("--data", f"no calibration statistics reached {group.consumer.name}", "calibration text the model runs on")
        order, rise = elimination_order(_weighted_consumer(group, entry), entry["input_gram"], count - fewest, options.channel_damping)
        orders.append(order)
        rises.append(rise)
    costs = [sum(m.shape[0] * m.shape[1] for m in g.members) // g.shape[0] for g in groups]  # parameters per channel
    keeps = allocate_channels(rises, costs, bounds, channels)
    layers = {}
    for group, order, count, keep in zip(groups, orders, channels, keeps):
        if stays_dense(keep, count):
            continue
        kept = kept_after(order, count, count - keep).to(group.consumer.weight().device)
        consumer = group.consumer.weight().detach()
        refitted = refit_consumer(consumer.float(), stats[group.consumer.name]["input_gram"], kept, options.channel_damping)
        for producer in group.producers:
            bias = getattr(producer.module, "bias", None)
            layers[producer.name] = ChannelLinear.from_weight(producer.weight().detach()[kept], kept, "rows", count,
                                                               None if bias is None else bias.detach()[kept])
        bias = getattr(group.consumer.module, "bias", None)
        layers[group.consumer.name] = ChannelLinear.from_weight(refitted.to(consumer.dtype), kept, "columns", count,
                                                                None if bias is None else bias.detach())
    return layers
