"""Semi-NMF (decompose/seminmf.py), magnitude pruning (decompose/prune.py) and the norm analysis: pure math."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmshrink.analysis.norms import correlate, matrix_norms, pearson, spearman
from lmshrink.decompose.prune import keep_ratio_for_lowrank, magnitude_prune
from lmshrink.decompose.seminmf import kmeans_columns, semi_nmf, seminmf_factors
from lmshrink.decompose.svd import truncated_svd
from lmshrink.errors import InvalidArgument
from lmshrink.methods import get_method


@pytest.fixture(autouse=True)
def one_thread():
    # These matrices are tiny: a second thread only adds synchronisation, which is very slow on busy cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _relative(x, approx):
    return float(torch.linalg.norm(x - approx) / torch.linalg.norm(x))


def test_seminmf_recovers_an_exact_semi_nonnegative_product():
    generator = torch.Generator().manual_seed(3)
    f = torch.randn(30, 3, generator=generator, dtype=torch.float64)
    g = torch.rand(20, 3, generator=generator, dtype=torch.float64)
    x = f @ g.T
    result = semi_nmf(x, 3, max_iter=600, tol=1e-12, init="svd")
    assert (result.g >= 0).all()
    assert result.relative_error < 2e-3
    assert _relative(x, result.f @ result.g.T) == pytest.approx(result.relative_error, rel=1e-6)


def test_seminmf_monotone_nonnegative_and_close_to_svd_on_mixed_sign_matrix():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(80, 24, generator=generator) @ torch.randn(24, 24, generator=generator) * 0.1
    result = semi_nmf(x, 6, max_iter=400, tol=1e-4)
    assert (result.g >= 0).all() and (result.f < 0).any()  # F keeps mixed signs
    errors = result.errors[:-1]
    assert all(later <= earlier + 1e-6 for earlier, later in zip(errors, errors[1:]))  # the objective never rises
    left, right = truncated_svd(x, 6)
    svd_error = _relative(x, left @ right)
    # Eckart-Young: nothing of rank 6 beats SVD; Semi-NMF should still come near it.
    assert svd_error <= result.relative_error < svd_error * 1.25
    assert result.converged and result.iterations < 400


def test_seminmf_deterministic_and_init_choices():
    x = torch.randn(50, 30, generator=torch.Generator().manual_seed(1))
    a, b = semi_nmf(x, 5, seed=7), semi_nmf(x, 5, seed=7)
    assert torch.equal(a.g, b.g)
    for init in ("svd", "random"):
        result = semi_nmf(x, 5, init=init, max_iter=200)
        assert (result.g >= 0).all() and result.relative_error < 1.0
    # Ding et al.'s k-means start is already a good fit: better first iterate than a random start.
    assert semi_nmf(x, 5, max_iter=1).errors[0] < semi_nmf(x, 5, init="random", max_iter=1).errors[0]


def test_kmeans_columns_separates_clear_clusters():
    centers = torch.tensor([[5.0, 0.0], [0.0, 5.0], [-5.0, -5.0]])
    points = torch.cat([c + 0.1 * torch.randn(20, 2, generator=torch.Generator().manual_seed(i)) for i, c in enumerate(centers)])
    _, labels = kmeans_columns(points.T, 3, 20, torch.Generator().manual_seed(0))
    for block in range(3):
        assert labels[block * 20:(block + 1) * 20].unique().numel() == 1
    assert labels.unique().numel() == 3


def test_seminmf_factor_orientation_and_method():
    w = torch.randn(80, 20, generator=torch.Generator().manual_seed(2))
    left, right = seminmf_factors(w, 6)
    assert left.shape == (80, 6) and right.shape == (6, 20) and (right >= 0).all()
    left, right = seminmf_factors(w, 6, nonnegative="left")
    assert (left >= 0).all() and left.shape == (80, 6)
    method = get_method("seminmf")
    options = method.resolve_options({"seminmf_iterations": 50})
    left, right = method.function(w, 6, {}, options)
    assert (right >= 0).all() and _relative(w, left @ right) < 1.0


@pytest.mark.parametrize("rank", [0, 21, 2.5])
def test_seminmf_bad_rank_is_a_clear_error(rank):
    with pytest.raises(InvalidArgument, match=r"rank.*1\.\.min\(m, n\) = 1\.\.20"):
        semi_nmf(torch.randn(30, 20), rank)


def test_magnitude_prune_keeps_the_largest_entries():
    w = torch.tensor([[0.1, -3.0, 0.5], [2.0, -0.2, 0.0]])
    pruned, mask = magnitude_prune(w, 0.5)
    assert mask.sum() == 3
    assert torch.equal(pruned, torch.tensor([[0.0, -3.0, 0.5], [2.0, 0.0, 0.0]]))
    big = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    pruned, mask = magnitude_prune(big, 0.3)
    assert int(mask.sum()) == int(0.3 * big.numel())
    assert big[mask].abs().min() >= big[~mask].abs().max()
    assert keep_ratio_for_lowrank((64, 32), 8) == pytest.approx(8 * 96 / (64 * 32))
    for bad in (0, 1.5, -0.1):
        with pytest.raises(InvalidArgument, match="keep_ratio"):
            magnitude_prune(big, bad)


def test_norms_match_direct_computation_and_correlation():
    w = torch.randn(40, 24, generator=torch.Generator().manual_seed(5))
    norms = matrix_norms(w)
    array = w.numpy().astype(np.float64)
    assert norms["l1"] == pytest.approx(np.abs(array).sum(), rel=1e-9)
    assert norms["nuclear"] == pytest.approx(np.linalg.norm(array, "nuc"), rel=1e-9)
    assert norms["row_l1_std"] == pytest.approx(np.abs(array).sum(1).std(), rel=1e-9)
    assert pearson([1, 2, 3, 4], [2, 4, 6, 8]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [1, 10, 100, 1000]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [1, 1, 1]) != pearson([1, 2, 3], [1, 1, 1])  # NaN for a constant side
    rows = [{"name": n, "l1": v, "nuclear": v, "row_l1_std": -v, "frobenius": v} for n, v in zip("abcd", [1.0, 2.0, 3.0, 5.0])]
    result = correlate(rows, {"a": 0.1, "b": 0.2, "c": 0.4, "d": 0.9})
    assert result["l1"]["spearman"] == pytest.approx(1.0) and result["row_l1_std"]["spearman"] == pytest.approx(-1.0)
