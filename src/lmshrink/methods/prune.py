"""Magnitude pruning as a baseline method, at the same parameter count as a low-rank factorization."""

from __future__ import annotations

from lmshrink.accounting import stays_dense
from lmshrink.decompose.prune import keep_ratio_for_lowrank, kept_count, magnitude_prune
from lmshrink.decompose.svd import check_rank
from lmshrink.errors import InvalidArgument
from lmshrink.methods import register_method


def keep_ratio_for_plan(plan, shape: tuple[int, int], name: str) -> float:
    """--ratio R keeps R of the entries; --rank K keeps as many entries as a rank-K factorization has parameters."""
    if plan.ratio is not None:
        return plan.ratio
    if plan.rank is not None:
        check_rank(plan.rank, shape, f"--rank (for {name}, {shape[0]}x{shape[1]})")
        return keep_ratio_for_lowrank(shape, plan.rank)
    raise InvalidArgument("--energy", "pruning has no singular-value energy", "--ratio R or --rank K with --method prune")


@register_method("prune", kind="module", summary="magnitude pruning: keep the largest |w| entries (baseline)",
                 target_kinds=("linear",))
def prune(target, plan, stats, options):
    from lmshrink.layers.lstm import PrunedLinear

    weight = target.weight().detach()
    keep = keep_ratio_for_plan(plan, tuple(weight.shape), target.name)
    if stays_dense(kept_count(weight.numel(), keep), weight.numel()):
        return None  # nothing to remove: the matrix stays dense
    pruned, mask = magnitude_prune(weight, keep)
    bias = getattr(target.module, "bias", None)
    return PrunedLinear.from_weight(pruned, mask, None if bias is None else bias.detach())
