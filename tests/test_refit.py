"""Error-compensating refit (issue 15, lever 1): the closed-form least squares alone, then in the block-by-block engine."""

from __future__ import annotations

import pytest
import torch

import lmshrink
from lmshrink.data import calibration_windows
from lmshrink.decompose.refit import output_error, refit_left
from lmshrink.sequential import compress_sequential
from test_sequential import WINDOW, WINDOWS, _plan, checkpoint, corpus  # noqa: F401 (fixtures)


def _sums(x_o, x_c):
    return (x_o.T @ x_c).double(), (x_c.T @ x_c).double(), (x_o.T @ x_o).double()


def test_refit_left_is_the_least_squares_optimum_under_any_row_weights():
    torch.manual_seed(0)
    weight, right = torch.randn(12, 10), torch.randn(4, 10)
    x_o = torch.randn(300, 10)
    x_c = x_o + 0.3 * torch.randn(300, 10)  # what the compressed layers before give it
    cross, gram, original_gram = _sums(x_o, x_c)
    left = refit_left(weight, right, cross, gram)
    target, design = (x_o @ weight.T).double(), (x_c @ right.T).double()
    expected = torch.linalg.lstsq(design, target).solution.T
    assert torch.allclose(left.double(), expected, atol=1e-4)
    direct = float(((target - design @ left.double().T) ** 2).sum() / (target ** 2).sum())
    assert output_error(weight, left, right, cross, gram, original_gram) == pytest.approx(direct, rel=1e-5)
    for _ in range(5):
        other = left + 0.05 * torch.randn_like(left)
        assert output_error(weight, other, right, cross, gram, original_gram) > direct
    rows = torch.rand(12, 1) + 0.1  # Fisher row weights (fwsvd, fwhiten) do not change the answer: rows separate
    assert torch.allclose(refit_left(rows * weight, right, cross, gram), rows * left, atol=1e-4)


def test_refit_survives_inputs_that_never_excite_a_direction():
    weight, right = torch.randn(6, 8), torch.randn(3, 8)
    x = torch.zeros(50, 8)
    x[:, :2] = torch.randn(50, 2)  # rank-2 inputs, rank-3 right factor: a singular system
    cross, gram, _ = _sums(x, x)
    left = refit_left(weight, right, cross, gram)
    assert torch.isfinite(left).all()
    assert torch.allclose(x @ right.T @ left.T, x @ weight.T, atol=1e-3)  # exact on what the inputs span


def _block_errors(loaded, reference, ids) -> list[float]:
    """Relative error of each block's output against the original model's, over the calibration windows."""
    with torch.no_grad():
        ours = loaded.model(ids, output_hidden_states=True).hidden_states[1:]
        theirs = reference.model(ids, output_hidden_states=True).hidden_states[1:]
    return [float((a - b).norm() / b.norm()) for a, b in zip(ours, theirs)]


@pytest.mark.parametrize("method,calibrate_on", [("svd", "compressed"), ("fwhiten", "compressed"), ("svdllm", "original")])
def test_refit_lowers_every_matrix_and_block_output_error_on_the_calibration_windows(checkpoint, corpus, tmp_path, method, calibrate_on):
    plan = _plan(method, ratio=0.3)
    plain = compress_sequential(checkpoint, plan, corpus, tmp_path / "plain", dtype="float32", device="cpu", calibrate_on=calibrate_on,
                                progress=False)
    fitted = compress_sequential(checkpoint, plan, corpus, tmp_path / "fitted", dtype="float32", device="cpu", calibrate_on=calibrate_on,
                                 progress=False, refit=True)
    assert fitted.plan["refit"] is True and plain.plan["refit"] is False
    rows = [row for row in fitted.modules if row["status"] == "factorized"]
    assert len(rows) == 14 and [r["rank"] for r in fitted.modules] == [r["rank"] for r in plain.modules]
    assert all(r["output_error"] <= r["output_error_before_refit"] for r in rows)
    assert sum(r["output_error"] < 0.95 * r["output_error_before_refit"] for r in rows) >= 4  # some were already data-optimal
    assert fitted.params_after == plain.params_after
    a, b = lmshrink.load(tmp_path / "plain"), lmshrink.load(tmp_path / "fitted")
    weights_a, weights_b = a.model.state_dict(), b.model.state_dict()
    # The refit moves left factors only; in the closed loop later blocks also calibrate on what refitted blocks produce.
    same = [k for k in weights_a if not k.endswith(".left") and (calibrate_on == "original" or not k.startswith("model.layers.1."))]
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in same)
    original = lmshrink.load_model(checkpoint)
    ids = calibration_windows(original, corpus, WINDOWS, WINDOW)
    before, after = _block_errors(a, original, ids), _block_errors(b, original, ids)
    assert all(y <= x for x, y in zip(before, after)), (before, after)


def test_linears_are_grouped_by_the_input_they_read_in_call_order():
    from conftest import tiny_llama
    from lmshrink.refit import input_groups

    model = tiny_llama().model
    block = model.model.layers[0]
    names = ["mlp.down_proj", "self_attn.o_proj", "mlp.up_proj", "self_attn.q_proj", "mlp.gate_proj", "self_attn.v_proj",
             "self_attn.k_proj"]
    hidden = torch.randn(1, 16, 64)
    position = torch.arange(16)[None]
    call = ((), {"position_embeddings": model.model.rotary_emb(hidden, position), "attention_mask": None, "position_ids": position})
    groups = input_groups(block, names, hidden, call)
    assert [sorted(g) for g in groups] == [["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                                           ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def test_whole_model_run_with_refit_compresses_with_the_block_engine_and_measures_both(checkpoint, corpus, tmp_path):
    """--refit without --sequential: the block engine's model, measured beside the original like any whole-model run."""
    from lmshrink.evaluate import corpus_perplexity
    from lmshrink.pipeline import EvalOptions, run

    plan = _plan("svd")
    evaluate = EvalOptions(tokens=256, window=WINDOW, samples=False, speed=True)
    result = run(checkpoint, plan, corpus, refit=True, evaluate=evaluate, out=tmp_path / "whole")
    compress_sequential(checkpoint, plan, corpus, tmp_path / "blocks", dtype="float32", device="cpu", progress=False, refit=True)
    ours, theirs = (lmshrink.load(tmp_path / name) for name in ("whole", "blocks"))
    mine, reference = ours.model.state_dict(), theirs.model.state_dict()
    assert set(mine) == set(reference) and all(torch.equal(mine[k], reference[k]) for k in mine)
    summary = result.to_dict()
    assert summary["plan"]["refit"] is True and summary["plan"]["calibrate_on"] == "compressed"
    assert summary["params"]["after"] < summary["params"]["before"]
    assert summary["perplexity"]["before"] == pytest.approx(corpus_perplexity(lmshrink.load_model(checkpoint), corpus, tokens=256,
                                                                              window=WINDOW, progress=False)["perplexity"], rel=1e-5)
    assert summary["perplexity"]["after"] == pytest.approx(corpus_perplexity(theirs, corpus, tokens=256, window=WINDOW,
                                                                             progress=False)["perplexity"], rel=1e-5)
    assert summary["tokens_per_s"]["before"] > 0 and summary["tokens_per_s"]["after"] > 0
    assert all(m["output_error"] <= m["output_error_before_refit"] + 1e-9 for m in summary["modules"])


def test_refit_without_sequential_distills_from_the_original_and_refuses_a_module(checkpoint, corpus, tmp_path):
    from lmshrink.errors import InvalidArgument
    from lmshrink.pipeline import EvalOptions, FinetuneOptions, run

    evaluate = EvalOptions(tokens=128, window=WINDOW, samples=False, speed=False)
    result = run(checkpoint, _plan("svd"), corpus, refit=True, evaluate=evaluate, finetune=FinetuneOptions(3, lr=1e-3, distill=True))
    assert result.finetune is not None and result.finetune["steps"] == 3
    fitted = {k: v for k, v in result.loaded.model.state_dict().items() if k.endswith(".left")}
    compress_sequential(checkpoint, _plan("svd"), corpus, tmp_path / "b", dtype="float32", device="cpu", progress=False, refit=True)
    untouched = lmshrink.load(tmp_path / "b").model.state_dict()
    assert any(not torch.equal(fitted[k], untouched[k]) for k in fitted)  # the training moved the refitted factors
    with pytest.raises(InvalidArgument, match="^model: .*checkpoint path or a built-in name"):
        run(lmshrink.load_model(checkpoint), _plan("svd"), corpus, refit=True, evaluate=evaluate)
