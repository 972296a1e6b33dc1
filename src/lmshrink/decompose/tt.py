"""Tensor-train (TT, also called MPS) decompositions: TT-SVD, batched over many vectors, and TT-matrices.

Plain tensor math, no modules. Conventions:

- A tensor train of an order-N tensor of shape (n_1, ..., n_N) is a list of N cores, core k of shape
  (r_{k-1}, n_k, r_k) with r_0 = r_N = 1; entry (i_1, ..., i_N) is the product of the matrices
  core_k[:, i_k, :].
- *Batched* trains decompose B vectors at once (TensorGPT: every token embedding row is its own train).
  Core k then has shape (B, R_{k-1}, n_k, R_k), where R_k is the largest rank any vector in the batch
  needed; a vector whose own rank r_k is smaller has zeros beyond it, so the padded train is exactly
  that vector's own TT-SVD. ``ranks`` (B, N+1) holds each vector's own ranks.
- A TT-matrix of a (V, d) matrix with V = v_1...v_N and d = d_1...d_N has cores (r_{k-1}, v_k, d_k, r_k);
  row index and column index are both split into N digits (row-major, first digit most significant).

Rank selection follows Oseledets (2011), "Tensor-Train Decomposition", Algorithm 1: with relative
tolerance eps every one of the N-1 truncations may drop at most eps / sqrt(N-1) * ||X||_F, which keeps
the whole error within eps * ||X||_F. A maximum rank caps every r_k as well.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from lmshrink.decompose.small_eigh import batched_eigh
from lmshrink.errors import InvalidArgument

# ---------------------------------------------------------------------------------------------- shapes


def _divisors(n: int) -> list[int]:
    small = [k for k in range(1, math.isqrt(n) + 1) if n % k == 0]
    return sorted(set(small + [n // k for k in small]))


def balanced_factorization(n: int, order: int) -> tuple[int, ...]:
    """n as a product of ``order`` factors as equal as possible (each >= 2 where n allows), in ascending order.

    Balanced factors keep the TT ranks' upper bounds, and so the cores, as small as possible for a given order.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidArgument("n", f"{n!r} is not a positive integer", "an integer >= 1")
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise InvalidArgument("order", f"{order!r} is not a positive integer", "an integer >= 1")
    best: tuple[float, tuple[int, ...]] | None = None

    def search(remaining: int, slots: int, smallest: int, chosen: tuple[int, ...]) -> None:
        nonlocal best
        if slots == 1:
            if remaining >= smallest:
                factors = chosen + (remaining,)
                # Spread of log-factors: 0 for a perfect power; ties go to the lexicographically first.
                spread = sum((math.log(f) - math.log(n) / order) ** 2 for f in factors)
                if best is None or spread < best[0] - 1e-12:
                    best = (spread, factors)
            return
        for f in _divisors(remaining):
            if f < smallest:
                continue
            if f ** slots > remaining:  # ascending order: the rest are >= f
                break
            search(remaining // f, slots - 1, f, chosen + (f,))

    search(n, order, 2 if n >= 2 ** order else 1, ())
    if best is None:  # n has fewer than `order` prime factors: pad with 1s
        search(n, order, 1, ())
    return best[1]


def padded_factorization(n: int, order: int, max_aspect: float = 2.0, slack: float = 0.01) -> tuple[int, ...]:
    """A balanced factorization of the smallest n' >= n (at most ``slack`` * n above) whose factors differ by at most
    ``max_aspect`` x; n itself when none does. For vocabularies like 30522 = 2 x 3 x 5087 that factor badly."""
    for candidate in range(n, n + max(1, int(n * slack)) + 1):
        factors = balanced_factorization(candidate, order)
        if max(factors) <= max_aspect * min(factors):
            return factors
    return balanced_factorization(n, order)


def parse_shape(shape: str | Sequence[int], product: int, argument: str = "shape") -> tuple[int, ...]:
    """A shape given as "8x8x9" (or "8,8,9") or a sequence of ints, checked to multiply to ``product``."""
    if isinstance(shape, str):
        parts = [p for p in shape.replace(",", "x").replace("*", "x").lower().split("x") if p.strip()]
        try:
            factors = tuple(int(p) for p in parts)
        except ValueError:
            raise InvalidArgument(argument, f"{shape!r} is not a list of integers", "factors joined by 'x', e.g. '8x8x9'") from None
    else:
        factors = tuple(shape)
    if not factors or any(isinstance(f, bool) or not isinstance(f, int) or f < 1 for f in factors):
        raise InvalidArgument(argument, f"{shape!r} has a factor that is not a positive integer", "positive integers, e.g. '8x8x9'")
    if math.prod(factors) != product:
        raise InvalidArgument(argument, f"{'x'.join(map(str, factors))} multiplies to {math.prod(factors)}, not {product}",
                              f"factors whose product is {product}, e.g. {'x'.join(map(str, balanced_factorization(product, 3)))}")
    return factors


def _check_max_rank(max_rank, bonds: int, argument: str = "max_rank") -> list[int | None]:
    """None, one int for every bond, or one int per bond (N-1 of them) -> a list of N-1 caps."""
    if max_rank is None:
        return [None] * bonds
    caps = [max_rank] * bonds if isinstance(max_rank, int) and not isinstance(max_rank, bool) else list(max_rank)
    if len(caps) != bonds or any(isinstance(r, bool) or not isinstance(r, int) or r <= 0 for r in caps):
        raise InvalidArgument(argument, f"{max_rank!r} is not a positive integer (or {bonds} of them, one per bond)",
                              "an integer >= 1, or one per TT bond")
    return caps


def _check_tolerance(tolerance, argument: str = "tolerance") -> float | None:
    if tolerance is None:
        return None
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 < tolerance < 1:
        raise InvalidArgument(argument, f"{tolerance!r} is outside (0, 1)",
                              "a relative Frobenius error eps with 0 < eps < 1 (delta-truncation)")
    return float(tolerance)


def _compute_dtype(tensor: Tensor, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------- TT-SVD


@dataclass
class BatchedTT:
    """B tensor trains of the same shape, padded to common ranks (see the module docstring)."""

    cores: list[Tensor]  # core k: (B, R_{k-1}, n_k, R_k)
    ranks: Tensor  # (B, N+1) int64: each train's own ranks, first and last column 1

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(core.shape[2] for core in self.cores)

    @property
    def padded_ranks(self) -> tuple[int, ...]:
        return (1,) + tuple(core.shape[3] for core in self.cores)

    def parameter_count(self) -> int:
        """Parameters of all trains at their own ranks: sum_b sum_k r_{k-1}(b) n_k r_k(b) (TensorGPT's count)."""
        return int(tt_parameter_counts(self.ranks, self.shape).sum())

    def stored_parameter_count(self) -> int:
        """Parameters of the padded cores actually held in memory."""
        return sum(core.numel() for core in self.cores)

    def reconstruct(self) -> Tensor:
        """(B, n_1 * ... * n_N): every train contracted back to its vector."""
        return tt_reconstruct_batched(self.cores)


def tt_parameter_counts(ranks: Tensor, shape: Sequence[int]) -> Tensor:
    """Per-train parameter count sum_k r_{k-1} n_k r_k from a (B, N+1) rank table."""
    sizes = torch.as_tensor(list(shape), dtype=torch.int64)
    return (ranks[:, :-1].to(torch.int64) * sizes * ranks[:, 1:].to(torch.int64)).sum(dim=1)


def _rank_from_spectrum(singular: Tensor, budget_sq: Tensor | None, cap: int | None) -> Tensor:
    """Per-row rank: the fewest singular values whose dropped tail has squared norm <= budget_sq, capped at cap."""
    batch, available = singular.shape
    if budget_sq is None:
        rank = torch.full((batch,), available, dtype=torch.int64, device=singular.device)
    else:
        squares = singular.square()
        # tail[:, i] = sum_{l >= i} s_l^2: the squared error of keeping i singular values.
        tail = squares.flip(1).cumsum(1).flip(1)
        rank = (tail > budget_sq[:, None]).sum(dim=1)
    rank = rank.clamp(min=1, max=available)
    if cap is not None:
        rank = rank.clamp(max=cap)
    return rank


# Unfoldings whose smaller side is at most this use the Gram solver under solver="auto".
GRAM_LIMIT = 64


def _truncated_svd(unfolding: Tensor, choose_rank) -> tuple[Tensor, Tensor, Tensor]:
    """(U_k, rank, diag(s_k) Vh_k) of a batch of matrices, k the largest rank ``choose_rank(singular values)`` asks for."""
    u, s, vh = torch.linalg.svd(unfolding, full_matrices=False)
    rank = choose_rank(s)
    keep = int(rank.max())
    return u[:, :, :keep], rank, s[:, :keep, None] * vh[:, :keep, :]


def _truncated_gram(unfolding: Tensor, choose_rank) -> tuple[Tensor, Tensor, Tensor]:
    """The same (U_k, rank, diag(s_k) Vh_k) as ``_truncated_svd``, from an eigendecomposition of the smaller Gram matrix.

    Batched LAPACK SVD pays a large per-matrix cost on tiny matrices; a p x p symmetric eigenproblem is
    several times cheaper, and ``batched_eigh`` solves many small ones in lockstep (small_eigh.py). The
    eigenproblem runs in the unfolding's precision: a float32 Gram matrix is itself only float32-accurate, and
    on SmolLM2's table the float32 run has the relative error of a float64 one to 9 digits (tt benchmark).
    Directions whose singular value is round-off next to the largest come back as zero columns, which is
    harmless: rank selection never keeps them ahead of nonzero ones. Only the k kept directions are
    projected, and every product takes its operands in the layout batched matmul runs fastest on.
    """
    _, rows, cols = unfolding.shape
    wide = rows <= cols
    transposed = unfolding.transpose(1, 2)
    gram = unfolding @ transposed if wide else transposed @ unfolding
    eigenvalues, vectors = batched_eigh(gram)  # ascending
    singular = eigenvalues.flip(-1).clamp_min(0).sqrt()
    alive = singular > singular[:, :1] * 1e-6
    singular = singular * alive
    rank = choose_rank(singular)
    keep = int(rank.max())
    # The k leading eigenvectors, descending, as rows (B, k, p): contiguous for the products below.
    basis = (vectors[:, :, -keep:].flip(-1) * alive[:, None, :keep]).transpose(1, 2).contiguous()
    singular = singular[:, :keep]
    if wide:
        # U are the Gram eigenvectors; U^T A = diag(s) Vh is exactly what the next TT-SVD step needs.
        return basis.transpose(1, 2), rank, basis @ unfolding
    # V are the Gram eigenvectors; U = A V / s and diag(s) Vh = diag(s) V^T.
    scale = torch.where(singular > 0, singular, torch.ones_like(singular))
    return (basis @ transposed).transpose(1, 2) / scale[:, None, :], rank, singular[:, :, None] * basis


def tt_svd_batched(
    vectors: Tensor,
    shape: Sequence[int],
    *,
    max_rank: int | Sequence[int] | None = None,
    tolerance: float | None = None,
    dtype: torch.dtype | None = None,
    solver: str = "auto",
) -> BatchedTT:
    """TT-SVD of every row of ``vectors`` (B, d), each reshaped to ``shape`` (product d), all at once.

    One batched SVD per bond replaces B separate TT-SVDs. Each row keeps its own ranks (tolerance gives
    rows different ranks); at least one of ``max_rank`` and ``tolerance`` should be given, or the trains
    are exact (full rank). Returns cores in float32 (float64 for float64 input, or ``dtype``).

    ``solver``: "svd" (batched LAPACK SVD), "gram" (eigendecomposition of each unfolding's small Gram matrix,
    by ``small_eigh.batched_eigh``; several times faster on many tiny unfoldings, same subspaces up to
    round-off; large batches spread over torch's threads) or "auto" (gram when many vectors have small unfoldings).
    """
    if solver not in ("auto", "svd", "gram"):
        raise InvalidArgument("solver", f"{solver!r} is not a solver", "'auto', 'svd' or 'gram'")
    if vectors.dim() != 2:
        raise InvalidArgument("vectors", f"has {vectors.dim()} dimensions", "a (B, d) matrix: one vector per row")
    shape = parse_shape(shape, vectors.shape[1])
    order = len(shape)
    caps = _check_max_rank(max_rank, order - 1)
    eps = _check_tolerance(tolerance)
    work = vectors.to(_compute_dtype(vectors, dtype))
    batch = work.shape[0]
    budget_sq = None
    if eps is not None and order > 1:
        # Oseledets: each of the N-1 truncations may drop (eps / sqrt(N-1)) * ||x|| in Frobenius norm.
        budget_sq = work.square().sum(dim=1) * (eps * eps / (order - 1))

    ranks = torch.ones(batch, order + 1, dtype=torch.int64, device=work.device)
    cores: list[Tensor] = []
    rest = work.reshape(batch, 1, -1)  # (B, R_{k-1}, n_k * ... * n_N), zeros beyond each row's own rank
    previous = 1
    for k in range(order - 1):
        unfolding = rest.reshape(batch, previous * shape[k], -1)
        use_gram = solver == "gram" or (solver == "auto" and batch > 1 and min(unfolding.shape[1:]) <= GRAM_LIMIT)
        truncate = _truncated_gram if use_gram else _truncated_svd
        u, rank, rest = truncate(unfolding, lambda singular: _rank_from_spectrum(singular, budget_sq, caps[k]))
        padded = int(rank.max())
        if int(rank.min()) < padded:  # rows with a smaller own rank: zero their padding
            keep = torch.arange(padded, device=work.device)[None, :] < rank[:, None]  # (B, R_k)
            u, rest = u * keep[:, None, :], rest * keep[:, :, None]
        cores.append(u.reshape(batch, previous, shape[k], padded))
        ranks[:, k + 1] = rank
        previous = padded
    cores.append(rest.reshape(batch, previous, shape[-1], 1))
    return BatchedTT(cores, ranks)


def tt_svd(
    tensor: Tensor,
    *,
    max_rank: int | Sequence[int] | None = None,
    tolerance: float | None = None,
    dtype: torch.dtype | None = None,
) -> list[Tensor]:
    """TT-SVD of one tensor of any order: cores (r_{k-1}, n_k, r_k) with ranks capped by max_rank and/or tolerance."""
    if tensor.dim() < 1:
        raise InvalidArgument("tensor", "is a scalar", "a tensor with at least one dimension")
    shape = tuple(tensor.shape)
    trains = tt_svd_batched(tensor.reshape(1, -1), shape, max_rank=max_rank, tolerance=tolerance, dtype=dtype)
    # One train: padded ranks are its own ranks.
    return [core[0] for core in trains.cores]


def tt_reconstruct(cores: Sequence[Tensor]) -> Tensor:
    """The full tensor (n_1, ..., n_N) of one train."""
    result = cores[0]  # (1, n_1, r_1)
    for core in cores[1:]:
        result = torch.tensordot(result, core, dims=([result.dim() - 1], [0]))
    return result.reshape([core.shape[1] for core in cores])


def tt_reconstruct_batched(cores: Sequence[Tensor]) -> Tensor:
    """(B, n_1 * ... * n_N): B trains with cores (B, R_{k-1}, n_k, R_k) contracted to vectors, batched."""
    batch = cores[0].shape[0]
    result = cores[0].reshape(batch, cores[0].shape[2], cores[0].shape[3])  # (B, n_1, R_1)
    for core in cores[1:]:
        # (B, P, R) x (B, R, n R') -> (B, P, n R'): one batched matmul per core.
        result = torch.bmm(result, core.reshape(batch, core.shape[1], -1)).reshape(batch, -1, core.shape[3])
    return result.reshape(batch, -1)


def tt_ranks(cores: Sequence[Tensor]) -> tuple[int, ...]:
    return (1,) + tuple(core.shape[-1] for core in cores)


# --------------------------------------------------------------------------------------- TT-matrix


def tt_matrix_svd(
    matrix: Tensor,
    row_shape: Sequence[int],
    col_shape: Sequence[int],
    *,
    max_rank: int | Sequence[int] | None = None,
    tolerance: float | None = None,
    dtype: torch.dtype | None = None,
) -> list[Tensor]:
    """TT-matrix (MPO) of a (V, d) matrix: cores (r_{k-1}, v_k, d_k, r_k), with V = prod(row_shape), d = prod(col_shape)."""
    if matrix.dim() != 2:
        raise InvalidArgument("matrix", f"has {matrix.dim()} dimensions", "a (V, d) matrix")
    rows, cols = matrix.shape
    row_shape = parse_shape(row_shape, rows, "row_shape")
    col_shape = parse_shape(col_shape, cols, "col_shape")
    if len(row_shape) != len(col_shape):
        raise InvalidArgument("row_shape/col_shape", f"orders {len(row_shape)} and {len(col_shape)} differ",
                              "the same number of factors for V and for d")
    order = len(row_shape)
    # (v_1..v_N, d_1..d_N) -> (v_1, d_1, v_2, d_2, ...) -> merge each (v_k, d_k) into one mode.
    tensor = matrix.reshape(*row_shape, *col_shape)
    tensor = tensor.permute(*[axis for k in range(order) for axis in (k, order + k)])
    merged = tensor.reshape([v * c for v, c in zip(row_shape, col_shape)])
    cores = tt_svd(merged, max_rank=max_rank, tolerance=tolerance, dtype=dtype)
    return [core.reshape(core.shape[0], v, c, core.shape[2]) for core, v, c in zip(cores, row_shape, col_shape)]


def tt_matrix_reconstruct(cores: Sequence[Tensor]) -> Tensor:
    """The dense (V, d) matrix of a TT-matrix."""
    order = len(cores)
    merged = tt_reconstruct([core.reshape(core.shape[0], -1, core.shape[3]) for core in cores])
    tensor = merged.reshape([size for core in cores for size in (core.shape[1], core.shape[2])])
    tensor = tensor.permute(*range(0, 2 * order, 2), *range(1, 2 * order, 2))
    return tensor.reshape(math.prod(core.shape[1] for core in cores), math.prod(core.shape[2] for core in cores))


def row_digits(ids: Tensor, row_shape: Sequence[int]) -> list[Tensor]:
    """Split flat row indices into mixed-radix digits (first digit most significant), one tensor per factor."""
    digits = []
    remaining = ids
    for size in reversed(row_shape):
        digits.append(remaining % size)
        remaining = torch.div(remaining, size, rounding_mode="floor")
    return digits[::-1]


def tt_matrix_rows(cores: Sequence[Tensor], ids: Tensor) -> Tensor:
    """Rows ``ids`` (flat, shape (B,)) of a TT-matrix as a (B, d) tensor, without building the matrix.

    Each row is a train whose k-th core is core_k[:, i_k, :, :]; the B trains are contracted batched.
    """
    digits = row_digits(ids, [core.shape[1] for core in cores])
    # core_k[:, i_k] gathered per row: (B, r_{k-1}, d_k, r_k), then the same contraction as per-token trains.
    gathered = [core.permute(1, 0, 2, 3)[digit] for core, digit in zip(cores, digits)]
    return tt_reconstruct_batched(gathered)


def tt_matrix_parameter_count(cores: Sequence[Tensor]) -> int:
    return sum(core.numel() for core in cores)
