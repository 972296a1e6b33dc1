"""GPTQ (error-compensated quantization): the pure routine, the ``gptq`` method, its layers and bytes."""

from __future__ import annotations

import pytest
import torch

import lmshrink
from conftest import tiny_llama
from lmshrink.accounting import count_bytes
from lmshrink.decompose.quantize import dequantize, quantize, quantize_compensated
from lmshrink.errors import InvalidArgument
from lmshrink.layers.quantized import QuantizedLinear


def _correlated_inputs(columns: int, tokens: int = 3000, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(columns, columns, generator=generator) / columns ** 0.5
    return torch.randn(tokens, columns, generator=generator) @ mixing + torch.randn(tokens, 1, generator=generator)


@pytest.mark.parametrize("group_size", [None, 16, 48])
def test_an_identity_gram_gives_round_to_nearest_exactly(group_size):
    weight = torch.randn(40, 96, generator=torch.Generator().manual_seed(1))
    plain = quantize(weight, 4, group_size)
    compensated = quantize_compensated(weight, 4, group_size, 7.0 * torch.eye(96), damping=0.0, block=32)
    assert torch.equal(compensated.packed, plain.packed)
    assert torch.equal(compensated.scales, plain.scales) and torch.equal(compensated.minimums, plain.minimums)


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("group_size", [None, 32])
def test_compensation_lowers_the_output_error_on_the_calibration_inputs(bits, group_size):
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(2))
    inputs = _correlated_inputs(128)
    gram = inputs.T @ inputs

    def output_error(quantized):
        return float(((inputs @ (weight - dequantize(quantized)).T) ** 2).sum())

    plain, compensated = quantize(weight, bits, group_size), quantize_compensated(weight, bits, group_size, gram)
    assert output_error(compensated) < 0.8 * output_error(plain)
    assert compensated.nbytes() == plain.nbytes()
    # Stored as quantize stores: every value on its group's grid (dequantize = minimum + code x scale, codes in range).
    assert dequantize(compensated).shape == weight.shape


def test_the_blocking_does_not_change_the_result():
    weight = torch.randn(24, 64, generator=torch.Generator().manual_seed(3))
    inputs = _correlated_inputs(64, seed=4)
    gram = inputs.T @ inputs
    one = dequantize(quantize_compensated(weight, 4, 16, gram, block=16))
    other = dequantize(quantize_compensated(weight, 4, 16, gram, block=64))
    assert torch.allclose(one, other, atol=1e-3)


def test_inputs_never_seen_and_bad_grams():
    weight = torch.randn(8, 12, generator=torch.Generator().manual_seed(5))
    inputs = _correlated_inputs(12)
    inputs[:, 3] = 0  # a dead input: its column is rounded plainly, nothing fails
    result = quantize_compensated(weight, 4, None, inputs.T @ inputs)
    assert torch.isfinite(dequantize(result)).all()
    with pytest.raises(InvalidArgument, match="gram"):
        quantize_compensated(weight, 4, None, torch.eye(11))
    with pytest.raises(InvalidArgument, match="bits"):
        quantize_compensated(weight, 7, None, torch.eye(12))


def test_the_gptq_method_beats_round_to_nearest_and_saves(prose, tmp_path):
    make = tiny_llama
    corpus = lmshrink.Corpus(prose.name, prose.train[:60_000], prose.test[:20_000], prose.source)
    models, reports = {}, {}
    for method in ("quantize", "gptq"):
        models[method] = make(seed=3)
        plan = lmshrink.Plan(method=method, targets=("linears",), ratio=1.0, bits=3, group_size=16,
                             calibration_windows=6, window=48)
        reports[method] = lmshrink.compress(models[method], plan, data=corpus, progress=False)
    dense = make(seed=3)
    ids = torch.tensor([dense.encode(corpus.train)[: 6 * 48]]).view(6, 48)  # the calibration windows themselves
    with torch.no_grad():
        reference = dense.logits(ids)
        errors = {m: float(((models[m].logits(ids) - reference) ** 2).mean()) for m in models}
    assert errors["gptq"] < errors["quantize"]
    assert reports["gptq"].bytes_after == reports["quantize"].bytes_after == count_bytes(models["gptq"].model)
    layers = [m for m in models["gptq"].model.modules() if isinstance(m, QuantizedLinear)]
    assert layers and all(layer.weight_q.bits == 3 and layer.weight_q.group_size == 16 for layer in layers)
    lmshrink.save(models["gptq"], tmp_path / "g")
    again = lmshrink.load(tmp_path / "g")
    with torch.no_grad():
        assert torch.equal(again.logits(ids), models["gptq"].logits(ids))



def test_gptq_bits_default_and_budget_prediction(prose):
    """Without --bits gptq stores 4 bits; a recipe's predicted bytes for a gptq stage equal what it stores."""
    from lmshrink.recipes import apply_recipe, parse_recipe

    corpus = lmshrink.Corpus(prose.name, prose.train[:60_000], prose.test[:20_000], prose.source)
    loaded = tiny_llama(seed=1)
    report = lmshrink.compress(loaded, lmshrink.Plan(method="gptq", targets=("linears",), ratio=1.0, calibration_windows=4,
                                                     window=32), data=corpus, progress=False)
    assert {row["bits"] for row in report.modules if "bits" in row} <= {4}
    assert all(m.weight_q.bits == 4 for m in loaded.model.modules() if isinstance(m, QuantizedLinear))
    budgeted = tiny_llama(seed=1)
    recipe = parse_recipe({"bytes": count_bytes(budgeted.model) // 2, "stages": [
        {"targets": ["linears"], "method": "gptq", "ratio": 1, "bits": 4, "group_size": 32, "calibration_windows": 4, "window": 32},
        {"targets": ["embedding", "lm_head"], "method": "svd", "ratio": 0.5}]})
    apply_recipe(budgeted, recipe, corpus, progress=False)
    assert count_bytes(budgeted.model) <= count_bytes(tiny_llama(seed=1).model) // 2


def test_a_tied_embedding_is_weighed_by_the_heads_inputs(prose):
    """The tied table's input Gram is the final hidden states' (the head's input), and gptq with it keeps the head's
    logits closer than rounding to nearest; an untied embedding is rounded to nearest."""
    from lmshrink.calibration import collect_stats
    from lmshrink.plan import select_targets

    corpus = lmshrink.Corpus(prose.name, prose.train[:60_000], prose.test[:20_000], prose.source)
    loaded = tiny_llama(seed=2, tie=True)
    targets = select_targets(loaded.candidates(), ("embedding",))
    stats = collect_stats(loaded, targets, corpus, {"input_gram"}, windows=4, window_len=32, progress=False, cache=False)
    ids = torch.tensor([loaded.encode(corpus.train)[: 4 * 32]]).view(4, 32)
    hidden = []
    hook = loaded.model.get_submodule("lm_head").register_forward_hook(lambda m, i, o: hidden.append(i[0].detach()))
    with torch.no_grad():
        loaded.logits(ids)
    hook.remove()
    x = torch.cat(hidden).reshape(-1, 64).double()
    assert torch.allclose(stats["model.embed_tokens"]["input_gram"], x.T @ x, rtol=1e-6)

    head_errors = {}
    for method in ("quantize", "gptq"):
        model = tiny_llama(seed=2, tie=True)
        lmshrink.compress(model, lmshrink.Plan(method=method, targets=("embedding",), ratio=1.0, bits=3, group_size=16,
                                               calibration_windows=4, window=32), data=corpus, progress=False)
        table = model.model.get_submodule("model.embed_tokens").dense_weight().double()
        head_errors[method] = float(((x @ (table - loaded.model.get_submodule("model.embed_tokens").weight.detach().double()).T) ** 2).sum())
    # What gptq minimizes: the logits' error on the calibration hidden states (the lookup side is not compensated).
    assert head_errors["gptq"] < 0.9 * head_errors["quantize"]
    # An untied table is looked up by one-hot ids (a diagonal Gram): gptq stores what rounding to nearest gives.
    untied = {}
    for method in ("quantize", "gptq"):
        model = tiny_llama(seed=2, tie=False)
        lmshrink.compress(model, lmshrink.Plan(method=method, targets=("embedding",), ratio=1.0, bits=4, group_size=16,
                                               calibration_windows=2, window=32), data=corpus, progress=False)
        untied[method] = model.model.get_submodule("model.embed_tokens").dense_weight()
    assert torch.equal(untied["gptq"], untied["quantize"])
    assert not torch.equal(untied["gptq"], tiny_llama(seed=2, tie=False).model.get_submodule("model.embed_tokens").weight)


def test_factors_are_rounded_on_the_stages_input_grams(prose):
    """Quantized factors (Plan.bits) of a calibrated stage: the low-rank right factor rounded on the input Gram, the
    left on what the rounded right one gives; a narrowed MLP consumer on its kept channels' Gram. Both keep the
    layer's output on the calibration inputs closer than rounding to nearest, at the same bytes."""
    from lmshrink.layers.channels import ChannelLinear
    from lmshrink.layers.lowrank import LowRankLinear
    from lmshrink.layers.quantized_factors import QuantizedChannelLinear, QuantizedLowRankLinear

    generator = torch.Generator().manual_seed(3)
    inputs = _correlated_inputs(128)
    gram = (inputs.T @ inputs).double()
    lowrank = LowRankLinear.from_factors(torch.randn(96, 24, generator=generator), torch.randn(24, 128, generator=generator))
    kept = torch.arange(0, 128, 2)
    consumer = ChannelLinear.from_weight(torch.randn(48, 64, generator=generator), kept, "columns", 128)

    def output_error(layer, quantized):
        return float(((inputs @ (layer.dense_weight() - quantized.dense_weight()).T.detach()) ** 2).sum())

    for layer, build in ((lowrank, QuantizedLowRankLinear.from_lowrank), (consumer, QuantizedChannelLinear.from_channels)):
        nearest, compensated = build(layer, 3, 16), build(layer, 3, 16, gram)
        assert output_error(layer, compensated) < 0.8 * output_error(layer, nearest)
        assert count_bytes(compensated) == count_bytes(nearest)

    # In a stage: calibrated methods round compensated, data-free ones to nearest; the row says which.
    corpus = lmshrink.Corpus(prose.name, prose.train[:60_000], prose.test[:20_000], prose.source)
    rounding = {}
    for method in ("svdllm", "svd"):
        report = lmshrink.compress(tiny_llama(seed=4), lmshrink.Plan(method=method, ratio=0.5, bits=3, group_size=16,
                                                                     calibration_windows=4, window=32), data=corpus, progress=False)
        rounding[method] = {row["rounding"] for row in report.modules}
    assert rounding == {"svdllm": {"compensated"}, "svd": {"nearest"}}


def _small(prose):
    return lmshrink.Corpus(prose.name, prose.train[:60_000], prose.test[:20_000], prose.source)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_rare_rows_take_fewer_bits_and_the_common_rows_are_unchanged(prose, tmp_path, tie):
    """--rare-bits: the least-counted share of the table's rows at fewer bits; every other row exactly as plain gptq
    stores it (rows round independently); bytes as the budget predicts; save/load gives the same logits."""
    from lmshrink.data import reference_text
    from lmshrink.frequencies import corpus_frequencies
    from lmshrink.layers.quantized import MixedBitsEmbedding
    from lmshrink.methods.gptq import rare_rows
    from lmshrink.plan import select_targets
    from lmshrink.recipes import predicted_size

    corpus = _small(prose)
    base = dict(method="gptq", targets=("embedding",), ratio=1.0, bits=4, group_size=16, calibration_windows=4, window=32)
    plain, mixed = tiny_llama(seed=5, tie=tie), tiny_llama(seed=5, tie=tie)
    lmshrink.compress(plain, lmshrink.Plan(**base), data=corpus, progress=False)
    plan = lmshrink.Plan(**base, options={"rare_bits": 2, "rare_share": 0.5})
    targets = select_targets(mixed.candidates(), ("embedding",))
    predicted = predicted_size(plan, targets, "bytes")
    bytes_before = count_bytes(mixed.model)
    report = lmshrink.compress(mixed, plan, data=corpus, progress=False)
    layer = mixed.model.get_submodule("model.embed_tokens")
    assert isinstance(layer, MixedBitsEmbedding) and (layer.common_q.bits, layer.rare_q.bits) == (4, 2)
    counts = corpus_frequencies(mixed, corpus.train, 256).counts
    reference = corpus_frequencies(mixed, reference_text(), 256).counts
    rare = rare_rows(counts, 0.5, reference)
    assert torch.equal(layer.rare, rare) and int(rare.sum()) == 128
    both = counts / counts.sum() + reference / reference.sum()  # each text weighs half
    assert float(both[rare].max()) <= float(both[~rare].min())  # the rare half is the least counted
    reference = plain.model.get_submodule("model.embed_tokens").dense_weight()
    assert torch.equal(layer.dense_weight()[~rare], reference[~rare])
    assert not torch.equal(layer.dense_weight()[rare], reference[rare])
    # 2-bit rows hold 4 values per row group at most: the rare rows really are on the coarser grid.
    assert all(len(torch.unique(row[:16])) <= 4 for row in layer.dense_weight()[rare])
    embedding_bytes = 256 * 64 * 4  # the float32 table it replaced (tied: the head reads the same one)
    assert report.bytes_after == count_bytes(mixed.model) == bytes_before - embedding_bytes + predicted
    lmshrink.save(mixed, tmp_path / "m")
    again = lmshrink.load(tmp_path / "m")
    ids = torch.tensor([mixed.encode(corpus.test)[:64]])
    with torch.no_grad():
        assert torch.equal(again.logits(ids), mixed.logits(ids))


def test_rare_rows_weigh_the_reference_text_as_much_as_the_calibration_text():
    from lmshrink.methods.gptq import rare_rows

    counts, reference = torch.tensor([10, 0, 0, 5]), torch.tensor([0, 100, 0, 0])
    # reference scaled to the calibration total (15): [10, 15, 0, 5]; without it the unused rows 1 and 2 (ties: higher id first)
    assert rare_rows(counts, 0.5, reference).tolist() == [False, False, True, True]
    assert rare_rows(counts, 0.5).tolist() == [False, True, True, False]
    assert rare_rows(counts, 0.5, torch.zeros(4, dtype=torch.long)).tolist() == [False, True, True, False]


def test_rows_most_text_needs_are_not_rare_for_a_calibration_text_that_lacks_them(prose):
    """A calibration text without line breaks or parentheses (WikiText-2 has no bare newline token) would put their rows
    among the rare ones; the reference text's counts (--rare-reference, the default) keep them at --bits."""
    from lmshrink.frequencies import corpus_frequencies

    corpus = _small(prose)
    flat = lmshrink.Corpus("flat", corpus.train.translate(str.maketrans("\n()", "   ")), corpus.test, "no newlines")
    base = dict(method="gptq", targets=("embedding",), ratio=1.0, bits=4, group_size=16, calibration_windows=2, window=32)
    probe = tiny_llama()
    needed = [probe.encode(c)[0] for c in "\n()"]
    unused = int((corpus_frequencies(probe, flat.train, 256).counts == 0).sum())  # every unused row rare without the reference
    masks = {}
    for reference in (True, False):
        model = tiny_llama(seed=7, tie=True)
        options = {"rare_bits": 2, "rare_share": unused / 256, "rare_reference": reference}
        lmshrink.compress(model, lmshrink.Plan(**base, options=options), data=flat, progress=False)
        masks[reference] = model.model.get_submodule("model.embed_tokens").rare
    assert masks[False][needed].all() and not masks[True][needed].any()
    assert int(masks[True].sum()) == int(masks[False].sum()) == unused


def test_rare_rows_keep_the_logits_closer_than_fewer_bits_everywhere(prose):
    """At equal bytes, the frequent rows at 4 bits and the rare at 2 lose less on text than 3 bits on every row."""
    corpus = _small(prose)
    base = dict(method="gptq", targets=("embedding",), ratio=1.0, group_size=16, calibration_windows=4, window=32)
    dense = tiny_llama(seed=6, tie=True)
    ids = torch.tensor([dense.encode(corpus.test)[: 4 * 48]]).view(4, 48)
    with torch.no_grad():
        reference = dense.logits(ids)
    errors, sizes = {}, {}
    for name, extra in (("uniform", {"bits": 3}), ("mixed", {"bits": 4, "options": {"rare_bits": 2, "rare_share": 0.5}})):
        model = tiny_llama(seed=6, tie=True)
        report = lmshrink.compress(model, lmshrink.Plan(**base, **extra), data=corpus, progress=False)
        with torch.no_grad():
            errors[name] = float(((model.logits(ids) - reference) ** 2).mean())
        sizes[name] = report.bytes_after
    assert sizes["mixed"] <= sizes["uniform"] + 256  # the same packed bits; the mixed table adds a bool per row
    assert errors["mixed"] < errors["uniform"]


def test_rare_bits_refusals(prose):
    corpus = _small(prose)
    base = dict(method="gptq", ratio=1.0, bits=4, calibration_windows=2, window=32)
    with pytest.raises(InvalidArgument, match="--rare-bits.*embedding"):
        lmshrink.compress(tiny_llama(), lmshrink.Plan(**base, targets=("linears",), options={"rare_bits": 2, "rare_share": 0.5}),
                          data=corpus, progress=False)
    with pytest.raises(InvalidArgument, match="--rare-share"):
        lmshrink.compress(tiny_llama(), lmshrink.Plan(**base, targets=("embedding",), options={"rare_bits": 2}),
                          data=corpus, progress=False)
    with pytest.raises(InvalidArgument, match="rare.share"):
        lmshrink.compress(tiny_llama(), lmshrink.Plan(**base, targets=("embedding",), options={"rare_bits": 2, "rare_share": 1.0}),
                          data=corpus, progress=False)


def test_a_mixed_bits_table_config_and_mask_are_checked():
    from lmshrink.errors import CorruptFile
    from lmshrink.layers.quantized import MixedBitsEmbedding

    config = {"num_embeddings": 10, "embedding_dim": 8, "padding_idx": None, "bits": 4, "rare_bits": 2, "rare_rows": 4,
              "group_size": None}
    layer = MixedBitsEmbedding.from_config(config, None)
    assert (layer.common_q.shape, layer.rare_q.shape) == ((6, 8), (4, 8))
    for key, value in (("rare_rows", 10), ("rare_bits", 7), ("rare_rows", -1)):
        with pytest.raises(CorruptFile, match=key):
            MixedBitsEmbedding.from_config({**config, key: value}, None)
    layer.rare[:3] = True  # three rows marked, four stored: refused rather than misplaced
    with pytest.raises(CorruptFile, match="marks 3 rows rare but stores 4"):
        layer(torch.tensor([0]))
