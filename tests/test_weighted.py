"""Pure math of importance-weighted low rank (lmshrink.decompose.weighted), against closed-form optima."""

import math

import pytest
import torch

from lmshrink.decompose.svd import truncated_svd
from lmshrink.decompose.weighted import (
    activation_scaled_svd,
    elementwise_weighted_lowrank,
    kronecker_error,
    kronecker_lowrank,
    kronecker_spectrum,
    output_eigenbasis,
    psd_sqrt,
    row_weighted_svd,
    safe_weights,
    two_sided_lowrank,
    weighted_error,
    weighted_spectrum,
    whitened_svd,
)
from lmshrink.errors import InvalidArgument


@pytest.fixture
def weight():
    torch.manual_seed(0)
    return torch.randn(48, 32, dtype=torch.float64)


def _inputs(n=32, tokens=400, seed=1):
    generator = torch.Generator().manual_seed(seed)
    # Very uneven input scales, as LLM activations have (a few outlier channels).
    scales = torch.logspace(-2, 1, n, dtype=torch.float64)
    return torch.randn(n, tokens, generator=generator, dtype=torch.float64) * scales[:, None]


def test_unweighted_is_plain_svd(weight):
    left, right = two_sided_lowrank(weight, 6)
    ref_left, ref_right = truncated_svd(weight, 6)
    assert torch.allclose(left @ right, ref_left @ ref_right, atol=1e-10)


def test_factors_are_balanced(weight):
    left, right = two_sided_lowrank(weight, 5, row_weights=torch.rand(48, dtype=torch.float64) + 0.1)
    assert torch.allclose(left.norm(dim=0), right.norm(dim=1), rtol=1e-8)


def test_whitening_reaches_the_output_error_optimum(weight):
    x = _inputs()
    left, right = whitened_svd(weight, 6, x @ x.T)
    achieved = torch.linalg.norm((weight - left @ right) @ x)
    # The best rank-6 W' for ||(W - W') X|| leaves exactly the tail singular values of W X.
    optimum = torch.linalg.svdvals(weight @ x)[6:].norm()
    assert achieved == pytest.approx(float(optimum), rel=1e-8)
    svd_left, svd_right = truncated_svd(weight, 6)
    assert achieved < 0.8 * torch.linalg.norm((weight - svd_left @ svd_right) @ x)


@pytest.mark.parametrize("perturb", [0.0, -1e-6])
def test_whitening_survives_singular_and_indefinite_grams(weight, perturb):
    x = _inputs(tokens=10)  # 10 tokens for 32 inputs: the Gram has rank 10
    gram = x @ x.T
    gram[0, 0] += perturb * gram[0, 0]  # round-off can make it indefinite
    root, how = psd_sqrt(gram)
    assert how == "eigh"
    left, right = whitened_svd(weight, 6, gram)
    assert torch.isfinite(left).all() and torch.isfinite(right).all()
    # Factors stay of the weight's scale: no inverse of a singular matrix blew them up.
    assert (left @ right).abs().max() < 10 * weight.abs().max()
    achieved = torch.linalg.norm((weight - left @ right) @ x)
    assert achieved == pytest.approx(float(torch.linalg.svdvals(weight @ x)[6:].norm()), rel=1e-6, abs=1e-8)


def test_psd_sqrt_uses_cholesky_when_it_can():
    x = _inputs()
    gram = x @ x.T
    root, how = psd_sqrt(gram)
    assert how == "cholesky"
    assert torch.allclose(root @ root.T, gram, rtol=1e-9, atol=1e-9 * float(gram.abs().max()))
    damped, _ = psd_sqrt(gram, damping=0.1)
    assert torch.allclose((damped @ damped.T).diagonal(), gram.diagonal() + 0.1 * gram.diagonal().mean())


def test_row_weighted_svd_is_optimal_for_row_weights(weight):
    rows = torch.rand(48, dtype=torch.float64) ** 4 + 1e-3
    importance = rows[:, None].expand_as(weight)
    left, right = row_weighted_svd(weight, 5, rows)
    achieved = weighted_error(weight, left @ right, importance)
    assert achieved == pytest.approx(float((weighted_spectrum(weight, rows)[5:] ** 2).sum()), rel=1e-8)
    svd_left, svd_right = truncated_svd(weight, 5)
    assert achieved < 0.9 * weighted_error(weight, svd_left @ svd_right, importance)
    # Equal row weights change nothing.
    same_left, same_right = row_weighted_svd(weight, 5, torch.full((48,), 3.0, dtype=torch.float64))
    assert torch.allclose(same_left @ same_right, svd_left @ svd_right, atol=1e-10)


def test_zero_importance_rows_are_kept_finite(weight):
    rows = torch.ones(48, dtype=torch.float64)
    rows[:10] = 0  # outputs the calibration never exercised
    left, right = row_weighted_svd(weight, 5, rows)
    assert torch.isfinite(left @ right).all()
    assert safe_weights(torch.zeros(4)).tolist() == [1.0] * 4


def test_asvd_scaling(weight):
    x = _inputs()
    abs_mean = x.abs().mean(1)
    svd_left, svd_right = truncated_svd(weight, 6)
    plain_left, plain_right = activation_scaled_svd(weight, 6, abs_mean, alpha=0.0)
    assert torch.allclose(plain_left @ plain_right, svd_left @ svd_right, atol=1e-10)
    left, right = activation_scaled_svd(weight, 6, abs_mean, alpha=1.0)
    # With alpha = 1 the objective is || (W - W') diag(mean |x|) ||: it must beat SVD on the outputs here.
    assert torch.linalg.norm((weight - left @ right) @ x) < torch.linalg.norm((weight - svd_left @ svd_right) @ x)


def test_elementwise_optimizer_improves_on_fwsvd_and_never_worsens(weight):
    generator = torch.Generator().manual_seed(3)
    importance = torch.rand(weight.shape, generator=generator, dtype=torch.float64) ** 6  # not row-structured
    start = row_weighted_svd(weight, 5, importance.sum(1))
    left, right, report = elementwise_weighted_lowrank(weight, importance, start, adam_steps=150, sgd_steps=50, adam_lr=1e-2, device="cpu")
    before = weighted_error(weight, start[0] @ start[1], importance)
    after = weighted_error(weight, left @ right, importance)
    assert after < 0.9 * before
    assert report.final_error < report.start_error
    assert report.final_error == pytest.approx(after / float((importance * weight * weight).sum()), rel=1e-4)
    # A learning rate that diverges must fall back to the best factors seen (the start).
    left, right, report = elementwise_weighted_lowrank(weight, importance, start, adam_steps=20, sgd_steps=0, adam_lr=1e6, device="cpu")
    assert weighted_error(weight, left @ right, importance) <= before * (1 + 1e-6)


def test_elementwise_stopping_rule(weight):
    # Uniform importance: truncated SVD is already optimal, so the first patience window finds no gain.
    start = truncated_svd(weight, 5)
    _, _, report = elementwise_weighted_lowrank(weight, torch.ones_like(weight), start, adam_steps=500, sgd_steps=500,
                                                adam_lr=1e-4, tolerance=1e-3, patience=10, device="cpu")
    assert report.adam_steps == 10 and report.sgd_steps == 10
    assert "converged" in report.stopped


def test_bad_input_is_named(weight):
    with pytest.raises(InvalidArgument, match="rank"):
        two_sided_lowrank(weight, 33)
    with pytest.raises(InvalidArgument, match="row_weights"):
        two_sided_lowrank(weight, 3, row_weights=torch.ones(47))
    with pytest.raises(InvalidArgument, match="row_weights.*zero"):
        two_sided_lowrank(weight, 3, row_weights=torch.zeros(48))
    with pytest.raises(InvalidArgument, match="row_importance.*negative"):
        row_weighted_svd(weight, 3, -torch.ones(48))
    nan = weight.clone()
    nan[0, 0] = math.nan
    with pytest.raises(InvalidArgument, match="weight.*NaN"):
        two_sided_lowrank(nan, 3)
    with pytest.raises(InvalidArgument, match="input_gram.*square"):
        psd_sqrt(torch.ones(3, 4))
    with pytest.raises(InvalidArgument, match="importance.*shape"):
        elementwise_weighted_lowrank(weight, torch.ones(3, 3), truncated_svd(weight, 2))
    with pytest.raises(InvalidArgument, match="alpha"):
        activation_scaled_svd(weight, 3, torch.ones(32), alpha=5)


def _output_gram(out=48, tokens=400, seed=2):
    # Correlated output gradients (a few directions carry most of the loss), as a trained LM's are.
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(out, 6, generator=generator, dtype=torch.float64) * torch.logspace(1, -1, 6, dtype=torch.float64)
    g = mixing @ torch.randn(6, tokens, generator=generator, dtype=torch.float64)
    g += 0.05 * torch.randn(out, tokens, generator=generator, dtype=torch.float64)
    return g @ g.T / tokens


def _sym_sqrt(matrix):
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def test_kronecker_lowrank_is_the_exact_minimizer(weight):
    x = _inputs()
    gram_out, gram_in = _output_gram(), x @ x.T / x.shape[1]
    # Reference by another route: the SVD of G^1/2 W A^1/2 with symmetric roots, truncated, unwhitened by inverses.
    g_half, a_half = _sym_sqrt(gram_out), _sym_sqrt(gram_in)
    u, s, vh = torch.linalg.svd(g_half @ weight @ a_half)
    spectrum = kronecker_spectrum(weight, gram_out, psd_sqrt(gram_in)[0])
    assert torch.allclose(spectrum, s, rtol=1e-8, atol=1e-10 * float(s[0]))
    errors = []
    for rank in (1, 4, 8, 16):
        left, right = kronecker_lowrank(weight, rank, gram_out, psd_sqrt(gram_in)[0])
        assert left.shape == (48, rank) and right.shape == (rank, 32) and left.dtype == torch.float64
        achieved = kronecker_error(weight, left @ right, gram_out, gram_in)
        assert achieved == pytest.approx(float((s[rank:] ** 2).sum()), rel=1e-7)  # the tail: nothing can do better
        best = torch.linalg.solve(g_half, (u[:, :rank] * s[:rank]) @ vh[:rank]) @ torch.linalg.inv(a_half)
        assert torch.allclose(left @ right, best, atol=1e-7 * float(weight.abs().max()))
        errors.append(achieved)
        # Random rank-k moves away from the optimum only add error.
        generator = torch.Generator().manual_seed(rank)
        for _ in range(3):
            moved = (left + 0.01 * torch.randn(left.shape, generator=generator, dtype=torch.float64)) @ right
            assert kronecker_error(weight, moved, gram_out, gram_in) > achieved
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.2 * errors[0]
    # The full G beats the best any diagonal G can do on its own objective (fwhiten's restriction).
    rows = gram_out.diagonal()
    left, right = two_sided_lowrank(weight, 4, row_weights=rows, input_sqrt=psd_sqrt(gram_in)[0])
    assert kronecker_error(weight, left @ right, gram_out, gram_in) > 1.05 * errors[1]


def test_kronecker_with_diagonal_output_gram_is_the_row_weighted_fit(weight):
    x = _inputs()
    rows = torch.rand(48, dtype=torch.float64) ** 3 + 1e-3
    root = psd_sqrt(x @ x.T)[0]
    left, right = kronecker_lowrank(weight, 5, torch.diag(rows), root)
    ref_left, ref_right = two_sided_lowrank(weight, 5, row_weights=rows, input_sqrt=root)
    assert torch.allclose(left @ right, ref_left @ ref_right, atol=1e-10 * float(weight.abs().max()))
    assert torch.allclose(left.norm(dim=0), right.norm(dim=1), rtol=1e-8)  # still balanced after the rotation
    assert torch.allclose(kronecker_spectrum(weight, torch.diag(rows), root), weighted_spectrum(weight, rows, root), rtol=1e-10)
    # float32 in, float32 out
    left32, right32 = kronecker_lowrank(weight.float(), 5, torch.diag(rows).float(), root.float())
    assert left32.dtype == right32.dtype == torch.float32


def test_kronecker_survives_singular_output_and_input_grams(weight):
    x = _inputs(tokens=10)  # input Gram of rank 10 for 32 inputs
    g = torch.randn(48, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    gram_out, gram_in = g @ g.T, x @ x.T  # output Gram of rank 3 for 48 outputs
    gram_out[0, 0] *= 1 - 1e-9  # and slightly indefinite from round-off
    for damping in (0.0, 0.1):
        left, right = kronecker_lowrank(weight, 6, gram_out, psd_sqrt(gram_in)[0], damping=damping)
        assert torch.isfinite(left).all() and torch.isfinite(right).all()
        assert (left @ right).abs().max() < 10 * weight.abs().max()  # nothing blew up through a near-zero eigenvalue
    left, right = kronecker_lowrank(weight, 2, gram_out, psd_sqrt(gram_in)[0])  # rank 2 of G^1/2 W X's 3: a tail is left
    values = torch.linalg.svdvals(_sym_sqrt(gram_out) @ weight @ x)
    assert float(values[2]) > 1e-3 * float(values[0])
    optimum = float(values[2:].square().sum())
    assert kronecker_error(weight, left @ right, gram_out, gram_in) == pytest.approx(optimum, rel=1e-4)
    basis, weights = output_eigenbasis(torch.zeros(48, 48))  # a layer the loss never reached: plain weights
    assert torch.equal(weights, torch.ones(48, dtype=torch.float64))
    assert torch.isfinite(kronecker_lowrank(weight, 3, torch.zeros(48, 48))[0]).all()


def test_output_eigenbasis_damping_and_bad_input(weight):
    gram = _output_gram()
    basis, weights = output_eigenbasis(gram, damping=0.5)
    expected = torch.linalg.eigvalsh(gram) + 0.5 * gram.diagonal().mean()
    assert torch.allclose(weights, expected, rtol=1e-9) and torch.allclose(basis @ basis.T, torch.eye(48, dtype=torch.float64), atol=1e-10)
    with pytest.raises(InvalidArgument, match="output_gram.*square"):
        output_eigenbasis(torch.ones(3, 4))
    with pytest.raises(InvalidArgument, match=r"output_gram.*\(48, 48\)"):
        kronecker_lowrank(weight, 3, torch.eye(32))
    nan = gram.clone()
    nan[1, 2] = math.nan
    with pytest.raises(InvalidArgument, match="output_gram.*NaN"):
        kronecker_lowrank(weight, 3, nan)
    with pytest.raises(InvalidArgument, match="damping"):
        output_eigenbasis(gram, damping=-1.0)
