"""Batched eigendecomposition of small symmetric matrices: the Jacobi kernel against LAPACK."""

import pytest
import torch

from lmshrink.decompose import small_eigh
from lmshrink.decompose.small_eigh import JACOBI_MIN_BATCH, batched_eigh, uses_jacobi

pytest.importorskip("numba")


def random_gram(batch: int, n: int, columns: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    factors = torch.randn(batch, n, columns, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    return factors @ factors.mT


def accuracy(dtype) -> float:
    return 500 * torch.finfo(dtype).eps  # 1.1e-13 in float64, 6e-5 in float32


def assert_eigendecomposition(matrices: torch.Tensor, values: torch.Tensor, vectors: torch.Tensor) -> None:
    """Ascending, orthonormal, and A V = V diag(values), each matrix judged against its own scale."""
    n = matrices.shape[-1]
    tolerance = accuracy(matrices.dtype)
    scale = matrices.flatten(1).abs().amax(dim=1).clamp_min(torch.finfo(matrices.dtype).tiny)
    assert torch.all(values[:, 1:] >= values[:, :-1])
    identity = torch.eye(n, dtype=matrices.dtype).expand_as(vectors)
    assert torch.allclose(vectors.mT @ vectors, identity, atol=tolerance)
    residual = (matrices @ vectors - vectors * values[:, None, :]).flatten(1).abs().amax(dim=1)
    assert torch.all(residual <= tolerance * scale), residual.max()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n", [1, 2, 5, 8, 9, 12])
def test_jacobi_matches_lapack_on_random_grams(n, dtype):
    # 300 matrices: not a multiple of the lane count, so the last group has idle lanes.
    matrices = random_gram(JACOBI_MIN_BATCH + 44, n, n + 3, seed=n, dtype=dtype)
    assert uses_jacobi(matrices)
    values, vectors = batched_eigh(matrices)
    assert values.dtype == vectors.dtype == dtype
    assert_eigendecomposition(matrices, values, vectors)
    expected = torch.linalg.eigvalsh(matrices.double())
    scale = expected.abs().amax(dim=1, keepdim=True)
    assert torch.all((values - expected).abs() <= accuracy(dtype) * scale)


def test_jacobi_on_hard_matrices():
    n = 8
    batch = JACOBI_MIN_BATCH
    matrices = random_gram(batch, n, 3, seed=7)  # rank 3: five zero eigenvalues each
    matrices[0] = 0.0  # all eigenvalues zero
    matrices[1] = torch.eye(n, dtype=torch.float64) * 2.5  # one eigenvalue of multiplicity n, already diagonal
    matrices[2] = torch.diag(torch.tensor([3.0, 3.0, 3.0, 1.0, 1.0, -2.0, -2.0, 5.0], dtype=torch.float64))
    rotation, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    matrices[3] = rotation @ matrices[2] @ rotation.T  # repeated and negative eigenvalues, not diagonal
    matrices[4] *= 1e-12  # a tiny matrix in the same lane group as ordinary ones: judged on its own scale
    matrices[5] *= 1e6
    matrices[6, 2, 3] = matrices[6, 3, 2] = float("nan")  # NaN in: NaN out, and its neighbours unharmed
    values, vectors = batched_eigh(matrices)
    assert values[6].isnan().all() and vectors[6].isnan().all()
    matrices, values, vectors = (torch.cat([t[:6], t[7:]]) for t in (matrices, values, vectors))
    assert_eigendecomposition(matrices, values, vectors)
    assert torch.equal(values[0], torch.zeros(n, dtype=torch.float64))
    assert torch.allclose(values[1], torch.full((n,), 2.5, dtype=torch.float64))
    expected = torch.tensor([-2.0, -2.0, 1.0, 1.0, 3.0, 3.0, 3.0, 5.0], dtype=torch.float64)
    assert torch.allclose(values[2], expected) and torch.allclose(values[3], expected, atol=1e-14)
    assert torch.allclose(values[4], torch.linalg.eigvalsh(matrices[4]), rtol=0, atol=1e-25)


def test_other_batches_go_to_lapack(monkeypatch):
    gram = random_gram(JACOBI_MIN_BATCH, 8, 10, seed=3)
    assert not uses_jacobi(gram.half())  # other dtypes: LAPACK
    assert not uses_jacobi(gram.clone().requires_grad_())  # gradients: LAPACK
    assert not uses_jacobi(gram[: JACOBI_MIN_BATCH - 1])  # small batch
    assert not uses_jacobi(random_gram(JACOBI_MIN_BATCH, small_eigh.JACOBI_MAX_SIZE + 1, 20, seed=4))
    monkeypatch.setattr(small_eigh, "jacobi_kernel", lambda: None)  # numba missing
    assert not uses_jacobi(gram)
    values, vectors = batched_eigh(gram)
    expected_values, expected_vectors = torch.linalg.eigh(gram)
    assert torch.equal(values, expected_values) and torch.equal(vectors, expected_vectors)


def test_thread_split_gives_the_one_thread_result():
    matrices = random_gram(small_eigh.PARALLEL_MIN_BATCH + 5, 6, 8, seed=5)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = batched_eigh(matrices)
        torch.set_num_threads(3)  # uneven chunks: they must come back in order
        shared = batched_eigh(matrices)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(alone[0], shared[0]) and torch.equal(alone[1], shared[1])
