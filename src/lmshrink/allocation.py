"""Who gets which rank: the second axis of lmshrink, independent of the factorization method."""

from __future__ import annotations

import importlib.util
from typing import Callable

from lmshrink.decompose.svd import check_rank, lowrank_params, rank_for_energy, rank_for_ratio, round_rank, svd
from lmshrink.errors import InvalidArgument
from lmshrink.plan import Plan, Target

# An allocation maps (targets, plan, stats) to {target name: rank, or None to stay dense}.
Allocation = Callable[[list[Target], Plan, dict], dict[str, int | None]]
ALLOCATIONS: dict[str, Allocation] = {}


def register_allocation(name: str):
    def decorate(function: Allocation) -> Allocation:
        ALLOCATIONS[name] = function
        return function

    return decorate


def keep_if_smaller(rank: int, shape: tuple[int, int]) -> int | None:
    """A rank, or None when the factors would hold at least as many parameters as the dense matrix."""
    return rank if lowrank_params(rank, shape) < shape[0] * shape[1] else None


@register_allocation("uniform")
def uniform(targets: list[Target], plan: Plan, stats: dict) -> dict[str, int | None]:
    """The same rule for every target: one ratio, one rank, or one energy level."""
    ranks = {}
    for target in targets:
        shape = target.shape
        if plan.ratio is not None:
            rank = rank_for_ratio(shape, plan.ratio)
        elif plan.rank is not None:
            rank = check_rank(plan.rank, shape, f"--rank (for {target.name}, {shape[0]}x{shape[1]})")
        else:
            rank = rank_for_energy(svd(target.weight().detach())[1], plan.energy)
        ranks[target.name] = keep_if_smaller(round_rank(rank, plan.multiple_of, min(shape)), shape)
    return ranks


def allocate(targets: list[Target], plan: Plan, stats: dict) -> dict[str, int | None]:
    _import_plugins()
    if plan.allocation not in ALLOCATIONS:
        raise InvalidArgument("--allocation", f"unknown allocation {plan.allocation!r}", ", ".join(sorted(ALLOCATIONS)))
    return ALLOCATIONS[plan.allocation](targets, plan, stats)


def _import_plugins() -> None:
    # Budgeted allocations live in lmshrink.budget (importance-aware); import it when present.
    if importlib.util.find_spec("lmshrink.budget") is not None:
        importlib.import_module("lmshrink.budget")
