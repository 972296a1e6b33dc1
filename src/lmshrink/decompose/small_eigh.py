"""Eigendecomposition of a large batch of small symmetric matrices, on the CPU.

torch.linalg.eigh hands a CPU batch to LAPACK one matrix at a time, and on an 8x8 matrix LAPACK spends about
6 microseconds, most of it in code paths built for large matrices. The cyclic Jacobi method instead runs the
same rotations on every matrix, so it can run in lockstep on lanes of matrices with the lanes in the innermost,
vectorized loop (the idea of cuSOLVER's syevjBatched, here on the CPU): 2-3x faster on 8x8 and 9x9. No
well-kept library offers this on the CPU, hence the hand-written kernel; it is compiled with numba when numba
can be imported, and torch.linalg.eigh does the work otherwise (and on other devices, dtypes and sizes).
"""

from __future__ import annotations

import functools
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

# The Jacobi kernel is used for float32 and float64 CPU batches of at least JACOBI_MIN_BATCH matrices of size at most
# JACOBI_MAX_SIZE: below that batch LAPACK's time is negligible, above that size its O(n^3) beats Jacobi's sweeps
# (benchmarks/results/small_eigh.md: 2.6x at n = 8, 1.2x at 12, 0.8x at 16).
JACOBI_MIN_BATCH = 256
JACOBI_MAX_SIZE = 12
# Set to False to send every batch to LAPACK (for comparisons).
USE_JACOBI = True
# Matrices that run in lockstep: long enough for the vectorizer, small enough for A and V to stay in L1.
LANES = 32
MAX_SWEEPS = 30
# Batches at least this large are split across torch's CPU threads.
PARALLEL_MIN_BATCH = 8192


def _jacobi_lanes(matrices, values, vectors, lanes, max_sweeps):  # pragma: no cover - compiled by numba
    """Cyclic Jacobi on ``lanes`` matrices at a time; writes ascending eigenvalues and their eigenvectors as columns.

    a[i, j, l] is entry (i, j) of lane l's matrix; w[i, :, l] is its i-th eigenvector estimate (V transposed, so
    that a rotation updates two contiguous rows). A lane is done when its off-diagonal squared norm is at most
    eps^2 times its squared Frobenius norm, measured per lane so that a tiny matrix beside a large one is judged
    against its own scale.
    """
    batch, n, _ = matrices.shape
    one = np.ones(1, matrices.dtype)[0]  # constants of the input's precision, so float32 stays float32
    zero = one - one
    two = one + one
    four = two + two
    eps = np.finfo(matrices.dtype).eps
    tolerance = eps * eps
    tiny = np.finfo(matrices.dtype).tiny
    dtype = matrices.dtype
    a = np.empty((n, n, lanes), dtype)
    w = np.empty((n, n, lanes), dtype)
    c = np.empty(lanes, dtype)
    s = np.empty(lanes, dtype)
    new_p = np.empty(lanes, dtype)
    new_q = np.empty(lanes, dtype)
    off = np.empty(lanes, dtype)
    total = np.empty(lanes, dtype)
    key = np.empty(n, dtype)
    for start in range(0, batch, lanes):
        used = min(lanes, batch - start)
        for i in range(n):
            for j in range(n):
                for lane in range(used):
                    a[i, j, lane] = matrices[start + lane, i, j]
                for lane in range(used, lanes):  # idle lanes hold the identity: already diagonal
                    a[i, j, lane] = 1.0 if i == j else 0.0
                for lane in range(lanes):
                    w[i, j, lane] = 1.0 if i == j else 0.0
        for _ in range(max_sweeps):
            off[:] = 0.0
            total[:] = 0.0
            for i in range(n):
                for lane in range(lanes):
                    total[lane] += a[i, i, lane] * a[i, i, lane]
                for j in range(i + 1, n):
                    for lane in range(lanes):
                        off[lane] += a[i, j, lane] * a[i, j, lane]
            done = True
            for lane in range(lanes):
                if off[lane] > tolerance * (total[lane] + two * off[lane]):
                    done = False
            if done:
                break
            for p in range(n - 1):
                for q in range(p + 1, n):
                    for lane in range(lanes):
                        apq = a[p, q, lane]
                        gap = a[q, q, lane] - a[p, p, lane]
                        # tan of the angle that zeroes a[p, q]: the smaller root, written without division by
                        # a[p, q] (t = 0 when a[p, q] = 0; the smallest normal number only keeps 0/0 away).
                        t = two * apq / (abs(gap) + np.sqrt(gap * gap + four * apq * apq) + tiny)
                        t = -t if gap < zero else t
                        cosine = one / np.sqrt(one + t * t)
                        c[lane] = cosine
                        s[lane] = t * cosine
                        new_p[lane] = a[p, p, lane] - t * apq
                        new_q[lane] = a[q, q, lane] + t * apq
                    for k in range(n):  # rows p and q of J^T A
                        for lane in range(lanes):
                            x = a[p, k, lane]
                            y = a[q, k, lane]
                            a[p, k, lane] = c[lane] * x - s[lane] * y
                            a[q, k, lane] = s[lane] * x + c[lane] * y
                    for k in range(n):  # columns p and q of J^T A J: by symmetry, the new rows
                        for lane in range(lanes):
                            a[k, p, lane] = a[p, k, lane]
                            a[k, q, lane] = a[q, k, lane]
                    for lane in range(lanes):  # the 2x2 block in closed form: exact zeros off the diagonal
                        a[p, p, lane] = new_p[lane]
                        a[q, q, lane] = new_q[lane]
                        a[p, q, lane] = 0.0
                        a[q, p, lane] = 0.0
                    for k in range(n):  # V J, as rows of V^T
                        for lane in range(lanes):
                            x = w[p, k, lane]
                            y = w[q, k, lane]
                            w[p, k, lane] = c[lane] * x - s[lane] * y
                            w[q, k, lane] = s[lane] * x + c[lane] * y
        for lane in range(used):  # ascending, as torch.linalg.eigh; ties keep their order
            for i in range(n):
                key[i] = a[i, i, lane] if a[i, i, lane] == a[i, i, lane] else math.inf  # NaN last: a total order
            for i in range(n):
                position = 0
                for j in range(n):
                    if key[j] < key[i] or (key[j] == key[i] and j < i):
                        position += 1
                values[start + lane, position] = a[i, i, lane]
                for k in range(n):
                    vectors[start + lane, k, position] = w[i, k, lane]


@functools.cache
def jacobi_kernel():
    """The numba-compiled kernel, or None when numba cannot be imported (then torch.linalg.eigh is used)."""
    try:
        import numba
    except ImportError:  # numba missing, or built for another numpy
        return None
    # error_model="numpy": division without a zero check, which would stop the lane loops from vectorizing.
    return numba.njit(nogil=True, cache=True, boundscheck=False, error_model="numpy",
                      fastmath={"contract"})(_jacobi_lanes)


def uses_jacobi(matrices: Tensor) -> bool:
    """Whether batched_eigh runs the Jacobi kernel on this batch (not one that needs gradients: LAPACK has them)."""
    return (USE_JACOBI and matrices.device.type == "cpu" and matrices.dtype in (torch.float32, torch.float64)
            and matrices.dim() == 3
            and not matrices.requires_grad
            and matrices.shape[0] >= JACOBI_MIN_BATCH and matrices.shape[-1] <= JACOBI_MAX_SIZE
            and jacobi_kernel() is not None)


def _jacobi(matrices: Tensor) -> tuple[Tensor, Tensor]:
    batch, n, _ = matrices.shape
    values = matrices.new_empty(batch, n)  # the kernel writes every entry
    vectors = matrices.new_empty(batch, n, n)
    jacobi_kernel()(matrices.contiguous().numpy(), values.numpy(), vectors.numpy(), LANES, MAX_SWEEPS)
    return values, vectors


def batched_eigh(matrices: Tensor) -> tuple[Tensor, Tensor]:
    """Same contract as torch.linalg.eigh on a batch (B, n, n): ascending eigenvalues, eigenvectors as columns.

    Large CPU batches are split over torch's threads: both the kernel and LAPACK release the GIL, and LAPACK
    alone would run a batch on one core.
    """
    solve = _jacobi if uses_jacobi(matrices) else torch.linalg.eigh
    workers = torch.get_num_threads()
    if matrices.device.type != "cpu" or workers < 2 or matrices.dim() != 3 or matrices.shape[0] < PARALLEL_MIN_BATCH:
        return solve(matrices)
    # Chunks of whole lane groups: each matrix meets the same neighbours, and gets the same bits, on any thread count.
    per_worker = -(-matrices.shape[0] // (workers * LANES)) * LANES
    with ThreadPoolExecutor(workers) as pool:
        parts = list(pool.map(solve, matrices.split(per_worker)))
    return torch.cat([values for values, _ in parts]), torch.cat([vectors for _, vectors in parts])
