"""Rank allocation under one global budget: the whole set of targets keeps ``ratio`` of its dense parameters.

``sensitivity`` (registered into lmshrink.allocation) spends the budget where it buys the most: greedily,
it gives up the rank-one component whose removal costs the least error per parameter saved, until the
targets fit the budget. The error of each matrix at each rank comes from the method itself
(``Method.error_spectrum``: the same weighted spectrum the method truncates), so allocation and factorization agree:

- Fisher + input Gram (fwhiten): singular values of G^1/2 W A^1/2, in loss units (nats);
- Fisher (fwsvd, tfwsvd): singular values of diag(mean row Fisher)^1/2 W, in loss units;
- input Gram (svdllm): singular values of W C, C C^T = Gram; input |x| means (asvd): of W diag(s);
- the others (svd, rsvd, seminmf): singular values of W.

Only the first two are comparable across matrices as they stand (a second-order estimate of the loss
increase); the others are divided by each matrix's total, i.e. relative error, the usual proxy.

The result meets the budget: total factor parameters <= budget, and within one rank step of it.

The error estimate is second order, so it is trusted only near the uniform allocation: ``Plan.max_shift``
(default 0.25) keeps every rank within +-25% of its uniform rank. Unbounded, the greedy exploits the
estimate's errors: on SmolLM2-135M at --ratio 0.8, fwhiten went from 50.0 (uniform) to 86.0 perplexity
while the estimate promised a smaller loss (benchmarks/results/importance64.md).
"""

from __future__ import annotations

import heapq
import math

import torch

from lmshrink.accounting import keep_if_smaller, largest_smaller_rank
from lmshrink.allocation import register_allocation, uniform
from lmshrink.distributed import SINGLE, World, matrix_cost, spread
from lmshrink.errors import InvalidArgument
from lmshrink.methods import get_method
from lmshrink.plan import Plan, Target


def allocate_budget(targets: list[Target], spectra: dict[str, torch.Tensor], budget: int,
                    multiple_of: int = 1, argument: str = "--ratio",
                    bounds: dict[str, tuple[int, int | None]] | None = None) -> dict[str, int | None]:
    """Ranks (None = stays dense) with total parameters <= ``budget``, chosen greedily by error per parameter saved.

    ``spectra[name]`` holds the error of dropping each rank-one component (descending). Every target starts
    dense (or at its upper bound); a step either factorizes it at its largest useful rank or drops
    ``multiple_of`` more components. ``bounds[name] = (lowest, highest)`` limits a target's rank
    (highest None: it may stay dense).
    """
    bounds = bounds or {}
    dense = {t.name: t.shape[0] * t.shape[1] for t in targets}
    lowest = {t.name: max(multiple_of, bounds.get(t.name, (multiple_of, None))[0]) for t in targets}
    floor = {t.name: (t.shape[0] + t.shape[1]) * lowest[t.name] if largest_smaller_rank(t.shape, multiple_of) else dense[t.name]
             for t in targets}
    total_dense = sum(dense.values())
    minimum = sum(floor.values())
    if budget < minimum:
        raise InvalidArgument(argument, f"a budget of {budget:,} parameters cannot be met: the targets need at least "
                              f"{minimum:,} (rank {multiple_of} everywhere)",
                              f"a budget >= {minimum:,} parameters, i.e. ratio >= {math.ceil(minimum / total_dense * 1e4) / 1e4:.4f}")
    ranks: dict[str, int | None] = {}
    for t in targets:
        top, highest = largest_smaller_rank(t.shape, multiple_of), bounds.get(t.name, (None, None))[1]
        ranks[t.name] = highest if top is not None and highest is not None and highest < top else None
    used = allocated_params(targets, ranks)
    heap = []

    def push(target: Target):
        name, (m, n) = target.name, target.shape
        rank = ranks[name]
        values = spectra[name]
        if rank is None:
            top = largest_smaller_rank(target.shape, multiple_of)
            if top is None:
                return
            cost, saved, new_rank = float(values[top:].sum()), dense[name] - top * (m + n), top
        else:
            new_rank = rank - multiple_of
            if new_rank < lowest[name]:
                return
            cost, saved = float(values[new_rank:rank].sum()), multiple_of * (m + n)
        heapq.heappush(heap, (cost / saved, name, new_rank, saved))

    by_name = {t.name: t for t in targets}
    for target in targets:
        push(target)
    while used > budget and heap:
        _, name, new_rank, saved = heapq.heappop(heap)
        ranks[name] = new_rank
        used -= saved
        push(by_name[name])
    return ranks


def allocated_params(targets: list[Target], ranks: dict[str, int | None]) -> int:
    return sum(t.shape[0] * t.shape[1] if ranks[t.name] is None else ranks[t.name] * (t.shape[0] + t.shape[1]) for t in targets)


def plan_budget(targets: list[Target], plan: Plan, stats: dict) -> int:
    """The parameter budget a plan sets: ratio x dense parameters, or what the uniform allocation would use."""
    if plan.ratio is not None:  # (1 + 1e-12): a --params budget N, stored as the ratio N / dense, gives back N
        return int(math.floor(plan.ratio * sum(t.shape[0] * t.shape[1] for t in targets) * (1 + 1e-12)))
    return allocated_params(targets, uniform(targets, plan, stats))


def shift_bounds(targets: list[Target], plan: Plan, stats: dict) -> dict[str, tuple[int, int | None]]:
    """Each target's rank range: its uniform rank -+ plan.max_shift of it, on the plan's rank multiple."""
    step = plan.multiple_of
    bounds = {}
    for target in targets:
        base = uniform([target], plan, stats)[target.name]
        top = largest_smaller_rank(target.shape, step)
        if top is None:
            continue
        center = top if base is None else base  # uniform leaves it dense: count from the largest useful rank
        low = max(step, math.floor(center * (1 - plan.max_shift) / step) * step)
        high = math.ceil(center * (1 + plan.max_shift) / step) * step
        bounds[target.name] = (low, None if base is None or high >= top else high)
    return bounds


@register_allocation("sensitivity")
def sensitivity(targets: list[Target], plan: Plan, stats: dict, world: World = SINGLE) -> dict[str, int | None]:
    """Ranks under the plan's global budget, spent where the weighted truncation error per parameter is lowest."""
    method = get_method(plan.method)
    found = weighted_spectra(targets, method, method.resolve_options(plan.options), lambda t: stats.get(t.name, {}), world)
    spectra = {target.name: values for target, (values, _) in zip(targets, found)}
    return ranks_from_spectra(targets, plan, stats, spectra, {in_loss for _, in_loss in found})


def weighted_spectra(targets: list[Target], method, options, stats_of, world: World = SINGLE) -> list[tuple[torch.Tensor, bool]]:
    """Each target's (weighted truncation-error spectrum on the CPU, whether it is in loss units) from
    ``Method.error_spectrum`` with ``stats_of(target)``; each an SVD, so several processes split them by cost."""
    def spectrum(index):
        target = targets[index]
        values, in_loss = method.error_spectrum(target.weight().float(), stats_of(target), options)
        return values.cpu(), torch.tensor([bool(in_loss)])

    found = spread(world, [matrix_cost(t.shape) for t in targets], spectrum, 2, torch.device("cpu"), "sharing spectra")
    return [(values, bool(in_loss)) for values, in_loss in found]


def ranks_from_spectra(targets: list[Target], plan: Plan, stats: dict, spectra: dict[str, torch.Tensor],
                       loss_units: set[bool]) -> dict[str, int | None]:
    """``sensitivity``'s ranks from spectra already computed (by Method.error_spectrum), e.g. streamed block by block."""
    if len(loss_units) > 1:
        # Mixed units cannot be compared: fall back to relative error everywhere.
        spectra = {name: v / v.sum().clamp_min(1e-300) for name, v in spectra.items()}
    ranks = allocate_budget(targets, spectra, plan_budget(targets, plan, stats), plan.multiple_of, "--ratio/--params",
                            bounds=None if plan.max_shift is None else shift_bounds(targets, plan, stats))
    return {name: (None if rank is None else keep_if_smaller(rank, by.shape)) for (name, rank), by in
            zip(ranks.items(), targets)}
