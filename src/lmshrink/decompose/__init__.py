"""Pure tensor decompositions: functions of tensors that know nothing of modules."""

from lmshrink.decompose.svd import (
    effective_rank,
    energy_at_rank,
    randomized_svd,
    rank_for_energy,
    rank_for_ratio,
    svd,
    truncated_svd,
)

__all__ = [
    "effective_rank",
    "energy_at_rank",
    "randomized_svd",
    "rank_for_energy",
    "rank_for_ratio",
    "svd",
    "truncated_svd",
]
