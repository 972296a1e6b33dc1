import math

import pytest
import torch

from lmshrink.decompose.svd import (
    effective_rank,
    energy_at_rank,
    randomized_svd,
    rank_for_energy,
    rank_for_ratio,
    round_rank,
    truncated_svd,
)
from lmshrink.errors import InvalidArgument


def low_rank_plus_noise(m, n, rank, noise, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g) + noise * torch.randn(m, n, generator=g)


@pytest.mark.parametrize("shape,rank", [((60, 40), 5), ((40, 60), 17), ((33, 33), 33)])
def test_truncated_svd_error_is_eckart_young_optimum(shape, rank):
    matrix = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    left, right = truncated_svd(matrix, rank)
    s = torch.linalg.svdvals(matrix)
    optimum = s[rank:].pow(2).sum().sqrt()
    assert left.shape == (shape[0], rank) and right.shape == (rank, shape[1])
    assert torch.linalg.norm(matrix - left @ right) == pytest.approx(float(optimum), rel=1e-9, abs=1e-9)


def test_factors_are_balanced():
    matrix = torch.randn(30, 20, dtype=torch.float64)
    left, right = truncated_svd(matrix, 6)
    # sqrt(S) on both sides: column norms of left equal row norms of right
    assert torch.allclose(left.norm(dim=0), right.norm(dim=1), rtol=1e-9)


def test_randomized_svd_is_near_optimal_on_decaying_spectrum():
    matrix = low_rank_plus_noise(300, 200, 20, 1e-3).double()
    left, right = truncated_svd(matrix, 20, randomized=True, generator=torch.Generator().manual_seed(0))
    optimum = torch.linalg.svdvals(matrix)[20:].pow(2).sum().sqrt()
    assert torch.linalg.norm(matrix - left @ right) <= 1.01 * optimum
    # with a geometrically decaying spectrum the leading singular triplets are recovered almost exactly
    g = torch.Generator().manual_seed(3)
    q1, _ = torch.linalg.qr(torch.randn(200, 60, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(150, 60, generator=g, dtype=torch.float64))
    spectrum = 0.5 ** torch.arange(60, dtype=torch.float64)
    matrix = q1 @ torch.diag(spectrum) @ q2.T
    u, s, vh = randomized_svd(matrix, 5, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(s, spectrum[:5], rtol=1e-6)
    assert torch.allclose(u.T @ u, torch.eye(5, dtype=u.dtype), atol=1e-8)


def test_low_precision_input_is_upcast():
    matrix = torch.randn(64, 48).to(torch.bfloat16)
    left, right = truncated_svd(matrix, 8)
    assert left.dtype == torch.float32
    reference = truncated_svd(matrix.float(), 8)
    assert torch.allclose(left @ right, reference[0] @ reference[1], atol=1e-4)


@pytest.mark.parametrize("rank", [0, -1, 41, 2.5])
def test_bad_rank_is_rejected(rank):
    with pytest.raises(InvalidArgument, match=r"rank.*allowed: an integer in 1\.\.40"):
        truncated_svd(torch.randn(50, 40), rank)


def test_rank_for_ratio_follows_definition():
    for shape in [(576, 576), (1536, 576), (49152, 576)]:
        for ratio in (0.9, 0.8, 0.6, 0.1):
            k = rank_for_ratio(shape, ratio)
            m, n = shape
            assert k * (m + n) <= ratio * m * n < (k + 1) * (m + n)
    with pytest.raises(InvalidArgument, match="ratio"):
        rank_for_ratio((10, 10), 0)
    with pytest.raises(InvalidArgument, match="ratio"):
        rank_for_ratio((10, 10), 1.5)


def test_rank_for_energy_and_energy_at_rank():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert rank_for_energy(s, 9 / 14) == 1
    assert rank_for_energy(s, 9 / 14 + 1e-6) == 2
    assert rank_for_energy(s, 1.0) == 3
    assert energy_at_rank(s, 2) == pytest.approx(13 / 14)
    with pytest.raises(InvalidArgument, match="energy"):
        rank_for_energy(s, 0.0)


def test_effective_rank_and_rounding():
    assert effective_rank(torch.ones(7)) == pytest.approx(7.0)
    assert effective_rank(torch.tensor([1.0, 0, 0])) == pytest.approx(1.0)
    assert round_rank(77, 8, 576) == 72
    assert round_rank(5, 8, 576) == 8
    assert round_rank(600, 8, 576) == 576
    assert math.isclose(round_rank(77, 1, 576), 77)
