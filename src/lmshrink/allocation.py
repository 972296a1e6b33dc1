"""Who gets which rank: the second axis of lmshrink, independent of the factorization method.

Allocations register in ALLOCATIONS ("uniform" here, "sensitivity" in lmshrink.budget).
"""

from __future__ import annotations

from typing import Callable

from lmshrink.accounting import keep_if_smaller
from lmshrink.distributed import SINGLE, World
from lmshrink.decompose.svd import check_rank, rank_for_energy, rank_for_ratio, round_rank, svd
from lmshrink.plan import Plan, Target
from lmshrink.registry import Registry

# An allocation maps (targets, plan, stats, world) to {target name: rank, or None to stay dense}; ``world``
# (lmshrink.distributed.World) lets one that computes spectra split them across processes.
Allocation = Callable[[list[Target], Plan, dict, World], dict[str, int | None]]
ALLOCATIONS: Registry[Allocation] = Registry("allocation", "--allocation", modules=("lmshrink.allocation", "lmshrink.budget"))


def register_allocation(name: str) -> Callable[[Allocation], Allocation]:
    return ALLOCATIONS.register(name)


def uniform_rank(target: Target, plan: Plan) -> int | None:
    """The uniform rule's rank for one target from a ratio or rank plan, without looking at the weights (None: energy
    plans, which need the spectrum). Raises InvalidArgument for a rank the matrix cannot have."""
    shape = target.shape
    if plan.ratio is not None:
        rank = rank_for_ratio(shape, plan.ratio)
    elif plan.rank is not None:
        rank = check_rank(plan.rank, shape, f"--rank (for {target.name}, {shape[0]}x{shape[1]})")
    else:
        return None
    return round_rank(rank, plan.multiple_of, min(shape))


@register_allocation("uniform")
def uniform(targets: list[Target], plan: Plan, stats: dict, world: World = SINGLE) -> dict[str, int | None]:
    """The same rule for every target: one ratio, one rank, or one energy level."""
    ranks = {}
    for target in targets:
        shape = target.shape
        rank = uniform_rank(target, plan)
        if rank is None:
            rank = round_rank(rank_for_energy(svd(target.weight().detach())[1], plan.energy), plan.multiple_of, min(shape))
        ranks[target.name] = keep_if_smaller(rank, shape)
    return ranks


def allocate(targets: list[Target], plan: Plan, stats: dict, world: World = SINGLE) -> dict[str, int | None]:
    return ALLOCATIONS.get(plan.allocation)(targets, plan, stats, world)


def check_amounts(targets: list[Target], plan: Plan) -> None:
    """Cheap checks of a plan's amount against its targets before any work (no spectra, no allocation): the allocation
    exists, and a --rank fits every matrix."""
    ALLOCATIONS.get(plan.allocation)
    for target in targets:
        uniform_rank(target, plan)
