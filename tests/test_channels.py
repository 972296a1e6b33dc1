"""MLP channel selection with a refitted down projection (--method nystrom, issue 15 lever 5)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import lmshrink
from conftest import tiny_llama
from lmshrink.channel_groups import ChannelTarget, channel_targets
from lmshrink.decompose.channels import elimination_order, kept_after, refit_consumer
from lmshrink.methods.nystrom import allocate_channels
from lmshrink.errors import InvalidArgument
from lmshrink.layers.channels import ChannelLinear
from lmshrink.plan import select_targets


def _correlated(samples=2000, channels=24, seed=0):
    """Hidden channels that partly predict each other (a low-rank part plus noise), like an MLP's."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(samples, 6, generator=generator, dtype=torch.float64) @ torch.randn(6, channels, generator=generator, dtype=torch.float64)
    hidden += 0.3 * torch.randn(samples, channels, generator=generator, dtype=torch.float64)
    consumer = torch.randn(10, channels, generator=generator, dtype=torch.float64)
    return hidden, consumer


def _error(hidden, consumer, kept, refitted):
    return float(((hidden @ consumer.T - hidden[:, kept] @ refitted.T) ** 2).sum())


def _eliminate(consumer, gram, keep):
    order, rises = elimination_order(consumer, gram, consumer.shape[1] - keep, damping=1e-12)
    kept = kept_after(order, consumer.shape[1], len(order))
    return kept, refit_consumer(consumer, gram, kept, damping=1e-12), rises


def test_the_refit_is_the_least_squares_consumer_and_beats_dropping_the_columns():
    hidden, consumer = _correlated()
    gram = hidden.T @ hidden
    kept, refitted, rises = _eliminate(consumer, gram, 12)
    assert kept.tolist() == sorted(set(kept.tolist())) and len(kept) == 12
    best = torch.linalg.lstsq(hidden[:, kept], hidden @ consumer.T).solution.T
    assert torch.allclose(refitted, best, rtol=1e-6, atol=1e-8)
    refit_error = _error(hidden, consumer, kept, refitted)
    assert refit_error < 0.5 * _error(hidden, consumer, kept, consumer[:, kept])
    # Each step's rise is what that removal cost; they add up to the final error (the full set's is zero).
    assert torch.all(rises >= 0) and len(rises) == 12
    assert float(rises.sum()) == pytest.approx(refit_error, rel=1e-6)


def test_the_ridge_pulls_the_refit_toward_the_pruned_columns_and_matches_the_elimination():
    hidden, consumer = _correlated(seed=3)
    gram = hidden.T @ hidden
    ridge = lambda damping: damping * float(gram.diagonal().mean())
    order, rises = elimination_order(consumer, gram, 12, damping=0.5)
    kept = kept_after(order, 24, 12)
    refitted = refit_consumer(consumer, gram, kept, damping=0.5)
    # The refit minimizes the regularized error E||W h - W_S h_S||^2 + lambda ||W_S - W[:, S]||^2; the elimination's
    # rises add up to that plus lambda ||W[:, dropped]||^2 (the same Gram C + lambda I): both see one problem.
    def regularized(candidate):
        return _error(hidden, consumer, kept, candidate) + ridge(0.5) * float(((candidate - consumer[:, kept]) ** 2).sum())
    dropped = float((consumer[:, order] ** 2).sum())
    assert regularized(refitted) + ridge(0.5) * dropped == pytest.approx(float(rises.sum()), rel=1e-6)
    for scale in (0.9, 1.1):
        assert regularized(refitted) < regularized(consumer[:, kept] + scale * (refitted - consumer[:, kept]))
    # Large damping: plain pruning (the kept columns unchanged); small: the least-squares refit, far from them.
    pruned = consumer[:, kept]
    assert torch.allclose(refit_consumer(consumer, gram, kept, damping=1e6), pruned, atol=1e-5)
    assert float((refit_consumer(consumer, gram, kept, damping=1e-12) - pruned).norm()) > 0.1 * float(pruned.norm())


def test_elimination_beats_random_subsets_and_keeps_everything_when_asked():
    hidden, consumer = _correlated(seed=1)
    gram = hidden.T @ hidden
    kept, refitted, _ = _eliminate(consumer, gram, 8)
    chosen = _error(hidden, consumer, kept, refitted)
    generator = torch.Generator().manual_seed(2)
    for _ in range(20):
        other = torch.randperm(24, generator=generator)[:8].sort().values
        fit = torch.linalg.lstsq(hidden[:, other], hidden @ consumer.T).solution.T
        assert chosen <= _error(hidden, consumer, other, fit)
    everything, same, rises = _eliminate(consumer, gram, 24)
    assert everything.tolist() == list(range(24)) and torch.allclose(same, consumer, atol=1e-6) and len(rises) == 0
    with pytest.raises(ValueError, match="remove is 24"):
        elimination_order(consumer, gram, 24)


def test_the_allocation_saves_the_uniform_budget_where_drops_cost_least():
    # Three groups of 10 channels; dropping from the second costs 100x more; uniform keeps 6 of each.
    rises = [torch.linspace(1, 2, 8), torch.linspace(100, 200, 8), torch.linspace(1.5, 2.5, 8)]
    bounds = [(3, 6, 9)] * 3  # keep within +-50% of 6
    keeps = allocate_channels(rises, [5, 5, 5], bounds, [10, 10, 10])
    assert sum(keeps) == 18 and keeps[1] == 9 and all(3 <= k <= 9 for k in keeps)
    assert allocate_channels(rises, [5, 5, 5], [(6, 6, 6)] * 3, [10, 10, 10]) == [6, 6, 6]  # no room: uniform
    # Unequal costs per channel: the budget (parameters) is never exceeded.
    keeps = allocate_channels(rises, [4, 6, 5], bounds, [10, 10, 10])
    assert sum((10 - k) * c for k, c in zip(keeps, [4, 6, 5])) <= 4 * 4 + 4 * 6 + 4 * 5


def test_mlps_are_grouped_whole_and_attention_alone_is_refused():
    loaded = tiny_llama()
    targets = channel_targets(select_targets(loaded.candidates(), ("linears",)))
    groups = [t for t in targets if isinstance(t, ChannelTarget)]
    assert [g.name for g in groups] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert [m.name.rsplit(".", 1)[1] for m in groups[0].members] == ["gate_proj", "up_proj", "down_proj"]
    assert groups[0].shape == (128, 64)
    assert len(targets) == 2 + 2 * 4  # the attention linears pass through
    with pytest.raises(InvalidArgument, match="--targets"):
        channel_targets(select_targets(loaded.candidates(), ("attention",)))


def _mlp_inputs(loaded, ids):
    inputs = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach().clone()))
             for layer in loaded.model.model.layers]
    with torch.no_grad():
        loaded.logits(ids)
    for hook in hooks:
        hook.remove()
    return inputs


def test_nystrom_keeps_exactly_the_ratio_of_each_mlp_and_saves(tmp_path, prose):
    corpus = lmshrink.Corpus(prose.name, prose.train[:100_000], prose.test[:20_000], prose.source)
    loaded = tiny_llama()
    original = copy.deepcopy(loaded.model.model.layers[0].mlp)
    ids = torch.tensor([loaded.encode(corpus.train)[:6 * 48]]).view(6, 48)  # the calibration windows themselves
    x = _mlp_inputs(loaded, ids)[0]
    attention = loaded.model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    plan = lmshrink.Plan(method="nystrom", ratio=0.75, calibration_windows=6, window=48, targets=["linears"])
    report = lmshrink.compress(loaded, plan, data=corpus, progress=False)
    factorized = [row for row in report.modules if row["status"] == "factorized"]
    assert len(factorized) == 6 and all(row["layer"] == "ChannelLinear" for row in factorized)
    assert all(row["params_after"] * 4 == row["params_before"] * 3 for row in factorized)  # 96 of 128 channels
    assert report.params_before - report.params_after == 2 * 3 * 32 * 64
    mlp = loaded.model.model.layers[0].mlp
    assert mlp.gate_proj.weight.shape == (96, 64) and mlp.down_proj.weight.shape == (64, 96)
    assert torch.equal(mlp.gate_proj.kept, mlp.down_proj.kept)
    assert torch.equal(loaded.model.model.layers[0].self_attn.q_proj.weight, attention)  # not an MLP: stays dense
    # On the first block's calibration inputs, the refitted MLP is closer to the original than the same channels
    # kept with the original down projection's columns.
    kept = mlp.down_proj.kept.long()
    with torch.no_grad():
        target = original(x)
        hidden = original.act_fn(original.gate_proj(x)) * original.up_proj(x)
        dropped = hidden[..., kept] @ original.down_proj.weight[:, kept].T
        assert float((mlp(x) - target).norm()) < float((dropped - target).norm())
    # Saved and loaded: the same layers and logits, without the original.
    lmshrink.save(loaded, tmp_path / "out")
    again = lmshrink.load(tmp_path / "out")
    assert isinstance(again.model.model.layers[1].mlp.down_proj, ChannelLinear)
    with torch.no_grad():
        assert torch.allclose(again.logits(ids), loaded.logits(ids), atol=1e-5)
    # A tampered manifest is refused in one line, naming what is wrong.
    manifest_path = tmp_path / "out" / "lmshrink.json"
    manifest = json.loads(manifest_path.read_text())
    entry = manifest["modules"]["model.layers.0.mlp.down_proj"]
    for key, value, message in (("side", "diagonal", "side"), ("dense_features", 10, "at most"), ("in_features", 97, "shape|97")):
        broken = copy.deepcopy(manifest)
        broken["modules"]["model.layers.0.mlp.down_proj"]["config"][key] = value
        manifest_path.write_text(json.dumps(broken))
        with pytest.raises(lmshrink.errors.CorruptFile, match=message):
            lmshrink.load(tmp_path / "out", verify=False)
    assert entry["layer"] == "ChannelLinear"


def test_nystrom_refuses_a_rank():
    loaded = tiny_llama()
    plan = lmshrink.Plan(method="nystrom", rank=8, calibration_windows=2, window=48, targets=["mlp"])
    corpus = lmshrink.Corpus("x", "hello world " * 2000, "hello world " * 200, "test")
    with pytest.raises(InvalidArgument, match="--ratio"):
        lmshrink.compress(loaded, plan, data=corpus, progress=False)


def test_a_channel_linear_stands_for_its_dense_layer():
    weight = torch.randn(5, 3)
    kept = torch.tensor([0, 2, 4])
    rows = ChannelLinear.from_weight(weight[kept], kept, "rows", 5, torch.arange(3.0))
    dense = rows.dense_weight().detach()
    assert torch.equal(dense[kept], weight[kept]) and float(dense[[1, 3]].abs().sum()) == 0
    x = torch.randn(2, 3)
    assert torch.allclose(rows(x), x @ weight[kept].T + torch.arange(3.0))
    columns = ChannelLinear.from_weight(weight.T[:, kept], kept, "columns", 5)
    assert torch.equal(columns.dense_weight()[:, kept], weight.T[:, kept])
    with pytest.raises(lmshrink.errors.CorruptFile, match="side"):
        ChannelLinear.from_config({"in_features": 3, "out_features": 5, "side": "diagonal", "dense_features": 5, "bias": False}, None)
    with pytest.raises(lmshrink.errors.CorruptFile, match="at most"):
        ChannelLinear.from_config({"in_features": 3, "out_features": 9, "side": "rows", "dense_features": 5, "bias": False}, None)


def test_a_module_method_refuses_a_sensitivity_allocation_before_calibrating():
    plan = lmshrink.Plan(method="prune", ratio=0.5, allocation="sensitivity", calibration_windows=2, window=48, targets=["mlp"])
    with pytest.raises(InvalidArgument, match="--allocation"):
        lmshrink.compress(tiny_llama(), plan, data=None, progress=False)


def test_a_sensitivity_allocation_spends_the_same_budget_unevenly(prose):
    corpus = lmshrink.Corpus(prose.name, prose.train[:100_000], prose.test[:20_000], prose.source)
    reports = {}
    for allocation in ("uniform", "sensitivity"):
        plan = lmshrink.Plan(method="nystrom", ratio=0.75, allocation=allocation, max_shift=0.2, calibration_windows=6,
                             window=48, targets=["mlp"])
        reports[allocation] = lmshrink.compress(tiny_llama(), plan, data=corpus, progress=False)
    assert reports["sensitivity"].params_after == reports["uniform"].params_after  # equal MLPs: the budget is met exactly
    kept = [row["params_after"] // 64 for row in reports["sensitivity"].modules if row["name"].endswith("down_proj")]
    assert sum(kept) == 2 * 96 and kept[0] != kept[1] and all(77 <= k <= 115 for k in kept)  # within +-20% of 96


@pytest.mark.parametrize("unit", ["bytes", "params"])
def test_a_nystrom_stage_under_a_recipe_budget_meets_it(prose, unit):
    from lmshrink.accounting import count_bytes, count_params
    from lmshrink.recipes import apply_recipe, parse_recipe

    corpus = lmshrink.Corpus(prose.name, prose.train[:100_000], prose.test[:20_000], prose.source)
    loaded = tiny_llama()
    before = count_bytes(loaded.model) if unit == "bytes" else count_params(loaded.model)
    limit = int(0.8 * before)
    recipe = parse_recipe({unit: limit, "stages": [
        {"targets": ["mlp"], "method": "nystrom", "ratio": 1, "calibration_windows": 6, "window": 48},
        {"targets": ["attention"], "method": "svd", "ratio": 1}]})
    apply_recipe(loaded, recipe, corpus, progress=False)
    record = loaded.recipe["budget"]
    measured = count_bytes(loaded.model) if unit == "bytes" else count_params(loaded.model)
    assert record["met"] and record["measured"] == measured <= limit
    assert measured > 0.9 * limit  # spent, not left unused
    assert isinstance(loaded.model.model.layers[0].mlp.down_proj, ChannelLinear)
    applied = loaded.recipe["applied"]
    assert applied[0]["ratio"] == pytest.approx(applied[1]["ratio"])  # both shares scaled by one factor


def test_the_builtin_channels_recipe_keeps_four_fifths_of_the_linears(prose):
    from dataclasses import replace

    from lmshrink.layers.lowrank import LowRankLinear
    from lmshrink.recipes import apply_recipe, builtin_recipes, load_recipe

    assert "channels" in builtin_recipes()
    stages = [replace(stage, calibration_windows=6, window=48) for stage in load_recipe("channels").stages]
    corpus = lmshrink.Corpus(prose.name, prose.train[:100_000], prose.test[:20_000], prose.source)
    loaded = tiny_llama()
    names = [t.name for t in select_targets(loaded.candidates(), ["linears"])]

    def held():
        return sum(p.numel() for name in names for p in loaded.model.get_submodule(name).parameters())

    dense = held()
    apply_recipe(loaded, stages, corpus, progress=False)
    assert 0.75 * dense < held() <= 0.8 * dense
    layers = loaded.model.model.layers
    assert all(isinstance(getattr(l.mlp, name), ChannelLinear) for l in layers for name in ("gate_proj", "up_proj", "down_proj"))
    assert any(isinstance(getattr(l.self_attn, name), LowRankLinear) for l in layers for name in ("q_proj", "k_proj", "v_proj", "o_proj"))


def test_export_dense_of_narrowed_mlps_loads_in_transformers_with_the_same_logits(tmp_path, prose):
    from transformers import AutoModelForCausalLM

    from lmshrink.export import export_dense

    corpus = lmshrink.Corpus(prose.name, prose.train[:100_000], prose.test[:20_000], prose.source)
    loaded = tiny_llama()
    plan = lmshrink.Plan(method="nystrom", ratio=0.75, calibration_windows=4, window=48, targets=["mlp"])
    lmshrink.compress(loaded, plan, data=corpus, progress=False)
    model = AutoModelForCausalLM.from_pretrained(export_dense(loaded, tmp_path / "dense"))
    ids = torch.tensor([loaded.encode(corpus.test)[:40]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, loaded.logits(ids), atol=1e-5)
    # The dropped channels are zero rows of gate/up and zero columns of down in the dense export.
    zero_rows = (model.model.layers[0].mlp.up_proj.weight.abs().sum(1) == 0).sum()
    assert int(zero_rows) == 128 - 96


def test_narrowed_mlps_store_their_weights_at_k_bits_and_load_back(tmp_path, prose):
    from lmshrink.accounting import count_bytes
    from lmshrink.layers.quantized import QuantizedLinear
    from lmshrink.layers.quantized_factors import QuantizedChannelLinear
    from lmshrink.recipes import predicted_size

    corpus = lmshrink.Corpus(prose.name, prose.train[:100_000], prose.test[:20_000], prose.source)
    floats, loaded = tiny_llama(), tiny_llama()
    plan = lmshrink.Plan(method="nystrom", ratio=0.75, calibration_windows=4, window=48, targets=["linears"])
    lmshrink.compress(floats, plan, data=corpus, progress=False)
    quantized = lmshrink.Plan(method="nystrom", ratio=0.75, calibration_windows=4, window=48, targets=["linears"], bits=4, group_size=32)
    targets = select_targets(loaded.candidates(), ["linears"])
    predicted = predicted_size(quantized, targets, "bytes")
    report = lmshrink.compress(loaded, quantized, data=corpus, progress=False)
    mlp, attention = loaded.model.model.layers[0].mlp, loaded.model.model.layers[0].self_attn
    assert all(isinstance(getattr(mlp, name), QuantizedChannelLinear) for name in ("gate_proj", "up_proj", "down_proj"))
    assert isinstance(attention.q_proj, QuantizedLinear)  # not in an MLP: left dense, so stored at the stage's bits too
    # The same channels as in float; the 4-bit weights within quantization error of the float ones.
    float_mlp = floats.model.model.layers[0].mlp
    assert torch.equal(mlp.down_proj.kept, float_mlp.down_proj.kept)
    with torch.no_grad():
        error = float((mlp.down_proj.dense_weight() - float_mlp.down_proj.dense_weight()).norm() / float_mlp.down_proj.dense_weight().norm())
    assert 0 < error < 0.15
    # Bytes counted honestly: what the layers hold is what a recipe budget predicts for the stage.
    held = sum(count_bytes(loaded.model.get_submodule(t.name)) for t in targets)
    assert held == predicted and report.bytes_after < count_bytes(floats.model)
    lmshrink.save(loaded, tmp_path / "q")
    again = lmshrink.load(tmp_path / "q")
    assert isinstance(again.model.model.layers[1].mlp.up_proj, QuantizedChannelLinear)
    ids = torch.tensor([loaded.encode(corpus.test)[:40]])
    with torch.no_grad():
        assert torch.allclose(again.logits(ids), loaded.logits(ids), atol=1e-5)
