"""Semi-NMF (Ding et al. 2010) as a low-rank method: W ~ left @ right with one factor non-negative."""

from __future__ import annotations

from dataclasses import dataclass

from lmshrink.bounds import Bounds
from lmshrink.decompose.seminmf import INIT_CHOICES, seminmf_factors
from lmshrink.methods import MethodOptions, option, register_method


@dataclass(frozen=True)
class SemiNMFOptions(MethodOptions):
    seminmf_iterations: int = option(300, "most multiplicative-update iterations", bounds=Bounds(1, 100_000))
    seminmf_tol: float = option(1e-5, "stop when the relative error improves by less than this", bounds=Bounds(0, 1))
    seminmf_init: str = option("kmeans", "initialisation of G", choices=INIT_CHOICES)
    nonnegative: str = option("right", "which factor is >= 0 (right acts on the input first)", choices=("right", "left"))


@register_method(
    "seminmf",
    summary="Semi-NMF: W ~ F G^T with G >= 0 by multiplicative updates (Winata et al. 2019 for LSTMs)",
    options=SemiNMFOptions,
)
def seminmf(weight, rank, stats, options: SemiNMFOptions):
    return seminmf_factors(weight, rank, nonnegative=options.nonnegative, max_iter=options.seminmf_iterations,
                           tol=options.seminmf_tol, init=options.seminmf_init, seed=0)
