"""Semi-NMF (Ding, Li & Jordan 2010): a mixed-sign matrix X ~ F G^T with only G >= 0.

Used by Winata et al. (2019) to compress LSTM gate matrices. F has free sign and G is non-negative, so
each column of X is approximated by a non-negative combination of the columns of F: F holds
"centroids", G soft cluster memberships.

Algorithm (Ding et al., Theorem 1):
    F <- X G (G^T G)^-1                                     (exact least squares for fixed G)
    G <- G * sqrt( ([X^T F]^+ + G [F^T F]^-) / ([X^T F]^- + G [F^T F]^+) )
with A^+ = (|A| + A)/2, A^- = (|A| - A)/2. The objective ||X - F G^T||_F never increases.
Initialisation is Ding et al.'s: k-means on the columns of X, G = indicator + 0.2. Pure tensor math.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lmshrink.errors import InvalidArgument

INIT_CHOICES = ("kmeans", "svd", "random")


@dataclass
class SemiNMFResult:
    """F (m, k) of any sign, G (n, k) >= 0, with X ~ F @ G.T; plus how the iterations went."""

    f: Tensor
    g: Tensor
    iterations: int
    converged: bool
    errors: list[float]  # relative Frobenius error ||X - F G^T|| / ||X|| after each iteration

    @property
    def relative_error(self) -> float:
        return self.errors[-1]


def _positive(a: Tensor) -> Tensor:
    return (a.abs() + a) / 2


def _negative(a: Tensor) -> Tensor:
    return (a.abs() - a) / 2


def check_seminmf_rank(rank, shape: tuple[int, int]) -> int:
    limit = min(shape)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0 or rank > limit:
        raise InvalidArgument("rank", f"{rank!r} does not fit a {shape[0]}x{shape[1]} matrix for Semi-NMF",
                              f"an integer in 1..min(m, n) = 1..{limit}")
    return rank


def kmeans_columns(x: Tensor, k: int, iterations: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(centroids (m, k), labels (n,)) of k-means on the n columns of ``x`` with k-means++ seeding."""
    points = x.T  # (n, m): one point per column
    n = points.shape[0]
    first = int(torch.randint(0, n, (1,), generator=generator))
    centers = [points[first]]
    nearest = ((points - centers[0]) ** 2).sum(1)
    for _ in range(1, k):
        # k-means++: sample the next seed with probability proportional to squared distance.
        total = nearest.sum()
        if total <= 0:
            index = int(torch.randint(0, n, (1,), generator=generator))
        else:
            index = int(torch.multinomial(nearest / total, 1, generator=generator))
        centers.append(points[index])
        nearest = torch.minimum(nearest, ((points - points[index]) ** 2).sum(1))
    centroids = torch.stack(centers)  # (k, m)
    labels = torch.zeros(n, dtype=torch.long)
    for step in range(iterations):
        distances = torch.cdist(points, centroids)
        new_labels = distances.argmin(1)
        if step > 0 and torch.equal(new_labels, labels):
            break
        labels = new_labels
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, labels, points)
        empty = counts == 0
        centroids = torch.where(empty[:, None], centroids, sums / counts.clamp_min(1)[:, None].to(points.dtype))
        if empty.any():
            # An empty cluster takes the point worst served by its centroid, so all k columns stay useful.
            worst = distances.gather(1, labels[:, None])[:, 0].argsort(descending=True)
            for slot, point in zip(empty.nonzero()[:, 0].tolist(), worst.tolist()):
                centroids[slot] = points[point]
    return centroids.T, labels


def _initial_g(x: Tensor, k: int, init: str, generator: torch.Generator) -> Tensor:
    n = x.shape[1]
    if init == "kmeans":
        _, labels = kmeans_columns(x, k, iterations=30, generator=generator)
        g = torch.full((n, k), 0.2, dtype=x.dtype)
        g[torch.arange(n), labels] += 1.0
        return g
    if init == "svd":
        # |V_k| scaled by the singular values: a non-negative start that already spans the dominant directions.
        _, s, vh = torch.linalg.svd(x, full_matrices=False)
        return (vh[:k].T.abs() * s[:k].sqrt()) + 1e-3 * s[0].sqrt()
    return torch.rand(n, k, generator=generator, dtype=x.dtype) + 0.1


def _solve_f(x: Tensor, g: Tensor) -> Tensor:
    # F = X G (G^T G)^-1, solved rather than inverted; a tiny ridge keeps it defined if G loses rank.
    gram = g.T @ g
    ridge = 1e-10 * gram.diagonal().mean().clamp_min(1e-30)
    gram = gram + ridge * torch.eye(gram.shape[0], dtype=g.dtype)
    return torch.linalg.solve(gram, (x @ g).T).T


def semi_nmf(
    x: Tensor,
    rank: int,
    *,
    max_iter: int = 300,
    tol: float = 1e-5,
    init: str = "kmeans",
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> SemiNMFResult:
    """Factorize ``x`` (m, n) as F (m, rank) @ G.T with G (n, rank) >= 0 by multiplicative updates.

    Stops when the relative error improves by less than ``tol`` (relative) between iterations, or after
    ``max_iter`` iterations. Deterministic for a given ``seed``.
    """
    if x.dim() != 2:
        raise InvalidArgument("x", f"shape {tuple(x.shape)} is not a matrix", "a 2-D tensor")
    check_seminmf_rank(rank, tuple(x.shape))
    if init not in INIT_CHOICES:
        raise InvalidArgument("init", f"{init!r} is not supported", ", ".join(INIT_CHOICES))
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise InvalidArgument("max_iter", f"{max_iter!r} is not a positive integer", "an integer >= 1")
    if not tol >= 0:
        raise InvalidArgument("tol", f"{tol!r} is negative", "tol >= 0 (relative improvement that counts as converged)")
    work_dtype = dtype or (torch.float64 if x.dtype == torch.float64 else torch.float32)
    device = x.device
    x = x.detach().to("cpu", work_dtype)
    generator = torch.Generator().manual_seed(seed)
    norm = torch.linalg.norm(x).clamp_min(torch.finfo(work_dtype).tiny)
    g = _initial_g(x, rank, init, generator)
    eps = torch.finfo(work_dtype).eps
    errors: list[float] = []
    converged = False
    iterations = 0
    for iterations in range(1, max_iter + 1):
        f = _solve_f(x, g)
        xtf = x.T @ f  # (n, k)
        ftf = f.T @ f  # (k, k)
        numerator = _positive(xtf) + g @ _negative(ftf)
        denominator = _negative(xtf) + g @ _positive(ftf)
        g = g * torch.sqrt(numerator / denominator.clamp_min(eps))
        error = float(torch.linalg.norm(x - f @ g.T) / norm)
        errors.append(error)
        if len(errors) > 1 and errors[-2] - error <= tol * max(errors[-2], eps):
            converged = True
            break
    # F is refreshed for the final G so the pair is the least-squares-consistent one.
    f = _solve_f(x, g)
    errors[-1] = float(torch.linalg.norm(x - f @ g.T) / norm)
    return SemiNMFResult(f.to(device), g.to(device), iterations, converged, errors)


def seminmf_factors(weight: Tensor, rank: int, *, nonnegative: str = "right", **options) -> tuple[Tensor, Tensor]:
    """(left (out, k), right (k, in)) with ``left @ right ~ weight`` and the chosen factor non-negative.

    ``nonnegative="right"``: right = G^T >= 0 (the factor applied to the input first); ``"left"``: left >= 0.
    """
    if nonnegative == "right":
        result = semi_nmf(weight, rank, **options)
        return result.f, result.g.T.contiguous()
    if nonnegative == "left":
        result = semi_nmf(weight.T, rank, **options)
        return result.g.contiguous(), result.f.T.contiguous()
    raise InvalidArgument("nonnegative", f"{nonnegative!r} is not supported", "'right' or 'left'")
