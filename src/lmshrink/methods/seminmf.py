"""Semi-NMF (Ding et al. 2010) as a low-rank method: W ~ left @ right with one factor non-negative."""

from __future__ import annotations

from lmshrink.bounds import Bounds
from lmshrink.decompose.seminmf import INIT_CHOICES, seminmf_factors
from lmshrink.methods import MethodOption, register_method


@register_method(
    "seminmf",
    summary="Semi-NMF: W ~ F G^T with G >= 0 by multiplicative updates (Winata et al. 2019 for LSTMs)",
    options=(
        MethodOption("seminmf_iterations", int, 300, "seminmf: most multiplicative-update iterations", bounds=Bounds(1, 100_000)),
        MethodOption("seminmf_tol", float, 1e-5, "seminmf: stop when the relative error improves by less than this", bounds=Bounds(0, 1)),
        MethodOption("seminmf_init", str, "kmeans", "seminmf: initialisation of G", INIT_CHOICES),
        MethodOption("nonnegative", str, "right", "seminmf: which factor is >= 0 (right acts on the input first)", ("right", "left")),
    ),
)
def seminmf(weight, rank, stats, options):
    return seminmf_factors(weight, rank, nonnegative=options["nonnegative"], max_iter=options["seminmf_iterations"],
                           tol=options["seminmf_tol"], init=options["seminmf_init"], seed=0)
