"""Truncated and randomized SVD, and the rank rules built on singular values.

Everything here is plain tensor math: no modules, no models.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lmshrink.errors import InvalidArgument


def _compute_dtype(matrix: Tensor, dtype: torch.dtype | None) -> torch.dtype:
    # Half-precision SVD is inaccurate or unsupported; float32 is the floor.
    if dtype is not None:
        return dtype
    return torch.float64 if matrix.dtype == torch.float64 else torch.float32


def check_rank(rank: int, shape: tuple[int, int], argument: str = "rank") -> int:
    limit = min(shape)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0 or rank > limit:
        raise InvalidArgument(argument, f"{rank!r} does not fit a {shape[0]}x{shape[1]} matrix", f"an integer in 1..{limit}")
    return rank


def split_singular_values(u: Tensor, s: Tensor, vh: Tensor) -> tuple[Tensor, Tensor]:
    """(U, S, Vh) -> (U sqrt(S), sqrt(S) Vh): balanced factors with ``left @ right = U S Vh``."""
    root = s.sqrt()
    return u * root, root[:, None] * vh


def svd(matrix: Tensor, *, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD computed in float32 or float64 on the matrix's device."""
    return torch.linalg.svd(matrix.to(_compute_dtype(matrix, dtype)), full_matrices=False)


def randomized_svd(
    matrix: Tensor,
    rank: int,
    *,
    oversample: int = 10,
    power_iterations: int = 2,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Halko-Martinsson-Tropp randomized SVD of rank ``rank``: (U (m,k), S (k,), Vh (k,n)).

    Power iterations are re-orthonormalized each step so that small singular values are not lost
    to round-off.
    """
    check_rank(rank, tuple(matrix.shape))
    work = matrix.to(_compute_dtype(matrix, dtype))
    m, n = work.shape
    sketch = min(rank + oversample, m, n)
    probe = torch.randn(n, sketch, generator=generator, dtype=work.dtype, device="cpu").to(work.device)
    basis, _ = torch.linalg.qr(work @ probe)
    for _ in range(power_iterations):
        basis, _ = torch.linalg.qr(work.T @ basis)
        basis, _ = torch.linalg.qr(work @ basis)
    u_small, s, vh = torch.linalg.svd(basis.T @ work, full_matrices=False)
    return (basis @ u_small)[:, :rank], s[:rank], vh[:rank]


def truncated_svd(
    matrix: Tensor,
    rank: int,
    *,
    randomized: bool = False,
    dtype: torch.dtype | None = None,
    **randomized_options,
) -> tuple[Tensor, Tensor]:
    """Best rank-``rank`` approximation in Frobenius and spectral norm (Eckart-Young), as (left, right).

    ``left @ right`` approximates ``matrix``; ``left`` is (m, rank), ``right`` is (rank, n).
    """
    check_rank(rank, tuple(matrix.shape))
    if randomized:
        u, s, vh = randomized_svd(matrix, rank, dtype=dtype, **randomized_options)
    else:
        u, s, vh = svd(matrix, dtype=dtype)
    return split_singular_values(u[:, :rank], s[:rank], vh[:rank])


def lowrank_params(rank: int, shape: tuple[int, int]) -> int:
    """Parameters of a rank-k factorization of an m x n matrix: k (m + n)."""
    return rank * (shape[0] + shape[1])


def rank_for_ratio(shape: tuple[int, int], ratio: float) -> int:
    """Largest rank whose factors keep at most ``ratio`` of the dense parameters: k (m+n) <= R m n."""
    if not 0 < ratio <= 1:
        raise InvalidArgument("ratio", f"{ratio!r} is outside (0, 1]", "0 < ratio <= 1 (fraction of dense parameters kept)")
    m, n = shape
    return max(1, math.floor(ratio * m * n / (m + n)))


def rank_for_energy(singular_values: Tensor, energy: float) -> int:
    """Smallest rank whose singular values keep at least ``energy`` of the squared Frobenius norm."""
    if not 0 < energy <= 1:
        raise InvalidArgument("energy", f"{energy!r} is outside (0, 1]", "0 < energy <= 1 (fraction of sum of squared singular values kept)")
    power = singular_values.double() ** 2
    kept = torch.cumsum(power, 0) / power.sum().clamp_min(torch.finfo(torch.float64).tiny)
    # A small tolerance stops round-off from asking one more rank for energy=1.
    return int(torch.searchsorted(kept, torch.tensor(energy - 1e-12, dtype=kept.dtype)).item()) + 1


def energy_at_rank(singular_values: Tensor, rank: int) -> float:
    power = singular_values.double() ** 2
    return float(power[:rank].sum() / power.sum())


def effective_rank(singular_values: Tensor) -> float:
    """Roy & Vetterli's effective rank: exp of the entropy of the normalized singular values."""
    p = singular_values.double() / singular_values.double().sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def round_rank(rank: int, multiple_of: int, limit: int) -> int:
    """Round a rank down to a multiple (hardware-friendly shapes), never below one multiple nor above ``limit``."""
    if multiple_of <= 1:
        return min(rank, limit)
    return min(max(multiple_of, rank // multiple_of * multiple_of), limit)
