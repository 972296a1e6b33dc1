"""Whole-model recipes (stages + budget), quantized factors on every factorized layer kind, and `lmshrink compare`."""

import json
import struct
from pathlib import Path

import pytest
import torch

import lmshrink
from lmshrink.accounting import count_bytes, count_params
from lmshrink.errors import InvalidArgument
from lmshrink.recipes import apply_recipe, load_recipe, parse_recipe
from tests.conftest import byte_tokenizer, invoke_cli, saved_weights, tiny_llama

EXAMPLE_YAML = """\
stages:
  - {targets: [embedding], method: groupreduce, ratio: 0.25, bits: 8}
  - {targets: [linears], method: fwhiten, ratio: 0.8, bits: 8, allocation: sensitivity}
"""


def long_llama(tie: bool, seed: int = 0):
    """tiny_llama with 512 positions: the example recipe calibrates on windows of 512 tokens (the Plan default)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, tie_word_embeddings=tie)
    return lmshrink.load_model(LlamaForCausalLM(config).eval(), tokenizer=byte_tokenizer())


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if not line.startswith("lmshrink [")]
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.output)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "; allowed: " in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def stored_sizes(path: Path) -> dict[str, int]:
    """Bytes of every tensor in a safetensors file, from its header (what is really on disk)."""
    with open(path, "rb") as handle:
        length = struct.unpack("<Q", handle.read(8))[0]
        header = json.loads(handle.read(length))
    return {name: info["data_offsets"][1] - info["data_offsets"][0] for name, info in header.items() if name != "__metadata__"}


@pytest.fixture(scope="module")
def prose_small():
    return lmshrink.load_corpus("pydoc")


# -- parsing ---------------------------------------------------------------------------------------------------------

def test_yaml_and_json_recipes_parse_to_the_same_plans(tmp_path):
    (tmp_path / "r.yaml").write_text(EXAMPLE_YAML)
    (tmp_path / "r.json").write_text(json.dumps({"stages": [
        {"targets": ["embedding"], "method": "groupreduce", "ratio": 0.25, "bits": 8},
        {"targets": ["linears"], "method": "fwhiten", "ratio": 0.8, "bits": 8, "allocation": "sensitivity"}]}))
    from_yaml, from_json = load_recipe(tmp_path / "r.yaml"), load_recipe(tmp_path / "r.json")
    assert from_yaml.stages == from_json.stages
    embedding, linears = from_yaml.stages
    assert (embedding.method, embedding.targets, embedding.ratio, embedding.bits) == ("groupreduce", ("embedding",), 0.25, 8)
    assert (linears.method, linears.ratio, linears.bits, linears.allocation) == ("fwhiten", 0.8, 8, "sensitivity")
    assert from_yaml.budget() is None
    # A method's own options may stand in the stage or under options; both end up in Plan.options.
    recipe = parse_recipe({"stages": [{"targets": "embedding", "method": "groupreduce", "ratio": 0.5, "groups": 4,
                                       "options": {"refine_steps": 0}}]})
    assert recipe.stages[0].options == {"groups": 4, "refine_steps": 0}
    half = load_recipe("half")
    assert half.bf16_fraction == 0.5 and [(p.method, p.bits) for p in half.stages] == [("gptq", 6), ("gptq", 6)]


# -- the example, as written -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_example_recipe_on_tiny_llama(tmp_path, prose_small, tie):
    (tmp_path / "r.yaml").write_text(EXAMPLE_YAML)
    loaded = long_llama(tie)
    ids = torch.tensor([loaded.encode(prose_small.test[:2000])[:128]])
    before_logits = loaded.logits(ids)
    dense_bytes = count_bytes(loaded.model)
    reports = apply_recipe(loaded, load_recipe(tmp_path / "r.yaml"), prose_small, progress=False)
    model = loaded.model
    assert [r.plan["method"] for r in reports] == ["groupreduce", "fwhiten"]
    embedding = model.model.embed_tokens
    assert type(embedding).__name__ == "BlockLowRankEmbedding" and embedding.bits == 8
    head = type(model.lm_head).__name__
    assert head == ("TiedHead" if tie else "Linear")
    if tie:
        assert model.lm_head.embedding is embedding
    linears = [m for n, m in model.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))]
    kinds = {type(m).__name__ for m in linears}
    # Factorized, or (sensitivity left it dense) a quantized dense matrix: no linear of the 8-bit stage stays float.
    assert kinds <= {"QuantizedLowRankLinear", "QuantizedLinear"} and "QuantizedLowRankLinear" in kinds
    # The stages' rows are all kept (saved in the manifest), each with its stage number.
    assert {row["stage"] for row in loaded.compression} == {1, 2}
    after = loaded.logits(ids)
    assert torch.isfinite(after).all()
    # Smaller, and the model still computes something close to the original.
    assert count_bytes(model) < (0.5 if tie else 0.6) * dense_bytes  # untied: the example leaves the output layer dense
    assert torch.nn.functional.cosine_similarity(after.flatten(), before_logits.flatten(), dim=0) > 0.5
    saved = lmshrink.save(loaded, tmp_path / "saved")
    again = lmshrink.load(saved)
    assert torch.allclose(again.logits(ids), after, atol=1e-5)
    assert count_bytes(again.model) == count_bytes(model)
    # The recipe travels with the model: load_recipe(saved dir) gives back the stages.
    reused = load_recipe(saved)
    assert reused.stages == load_recipe(tmp_path / "r.yaml").stages


# -- quantized factors: every layer kind, round trip, bytes ----------------------------------------------------------

LAYER_CASES = [
    ("svd", ("linears",), False, "QuantizedLowRankLinear"),
    ("svd", ("embedding",), True, "QuantizedLowRankEmbedding"),
    ("svd", ("embedding",), False, "QuantizedLowRankEmbedding"),
    ("tt", ("embedding",), True, "QuantizedTTEmbedding"),
    ("tt-matrix", ("embedding",), False, "QuantizedTTMatrixEmbedding"),
    ("groupreduce", ("embedding", "lm_head"), False, "BlockLowRankEmbedding"),
    ("groupreduce", ("embedding",), True, "BlockLowRankEmbedding"),
]
# Every layer kind at 4 bits in groups of 16 columns; the other widths (8, 6, 3; per row or grouped) on some kinds.
QUANT_CASES = ([(*case, 4, 16) for case in LAYER_CASES]
               + [(*LAYER_CASES[0], 8, None), (*LAYER_CASES[0], 6, 16), (*LAYER_CASES[0], 3, None),
                  (*LAYER_CASES[1], 6, None), (*LAYER_CASES[3], 3, None), (*LAYER_CASES[6], 8, None)])


@pytest.mark.parametrize("method,targets,tie,layer,bits,group_size", QUANT_CASES,
                         ids=[f"{c[0]}-{'+'.join(c[1])}-{'tied' if c[2] else 'untied'}-{c[4]}bit-g{c[5]}" for c in QUANT_CASES])
def test_quantized_factors_round_trip_and_bytes_are_what_is_stored(tmp_path, prose_small, method, targets, tie, layer, bits, group_size):
    loaded = tiny_llama(tie=tie)
    ids = torch.arange(0, 256).view(2, 128) % 256
    plan = lmshrink.Plan(method=method, targets=targets, ratio=0.5, bits=bits, group_size=group_size, calibration_windows=2, window=64)
    report = lmshrink.compress(loaded, plan, data=prose_small, progress=False)
    rows = report.compressed
    assert rows and all(row["bits"] == bits and row["layer"] == layer for row in rows if row["kind"] != "lm_head") and all(
        row["bits"] == bits for row in rows)
    out = loaded.logits(ids)
    saved = lmshrink.save(loaded, tmp_path / "q")
    again = lmshrink.load(saved)
    assert torch.equal(again.logits(ids), out)
    # Accounting = what the file holds: per quantized module and for the whole model (tied tensors stored once).
    sizes = stored_sizes(saved_weights(saved))
    assert sum(sizes.values()) == count_bytes(loaded.model) == report.bytes_after
    for row in rows:
        module = loaded.model.get_submodule(row["name"])
        assert row["bytes_after"] == count_bytes(module) == sum(v for k, v in sizes.items() if k.startswith(row["name"] + "."))
        for name, packed in module.named_modules():
            if type(packed).__name__ == "PackedTensor":
                rows_, columns = packed.shape
                groups = 1 if group_size is None else -(-columns // min(group_size, columns))
                prefix = f"{row['name']}.{name}."
                assert sizes[prefix + "packed"] == -(-rows_ * columns * bits // 8)
                assert sizes[prefix + "scales"] == sizes[prefix + "minimums"] == rows_ * groups * 2
        assert 0 < row["quantization_error"] < {8: 0.02, 6: 0.06, 4: 0.25, 3: 0.5}[bits]
    if tie:
        assert type(loaded.model.lm_head).__name__ == "TiedHead"
        assert type(again.model.lm_head).__name__ == "TiedHead" and again.model.lm_head.embedding is again.model.model.embed_tokens


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_targets_left_dense_by_a_bits_stage_are_quantized_too(tmp_path, tie):
    loaded = tiny_llama(tie=tie)
    ids = torch.arange(0, 128).view(1, 128)
    # Full rank: no factorization is smaller than dense, so every target stays dense, and is stored at 8 bits.
    report = lmshrink.compress(loaded, lmshrink.Plan(method="svd", targets=("*.q_proj", "*.o_proj", "embedding"), rank=64, bits=8),
                               progress=False)
    assert {row["status"] for row in report.modules} == {"dense, quantized"}
    assert {row["layer"] for row in report.modules} == {"QuantizedLinear", "QuantizedEmbedding"}
    assert all(0 < row["quantization_error"] < 0.02 for row in report.modules)
    assert type(loaded.model.lm_head).__name__ == ("TiedHead" if tie else "Linear")
    out = loaded.logits(ids)
    again = lmshrink.load(lmshrink.save(loaded, tmp_path / "q"))
    assert torch.equal(again.logits(ids), out) and count_bytes(again.model) == report.bytes_after
    assert report.bytes_before - report.bytes_after == sum(4 * row["params_before"] - row["bytes_after"] for row in report.modules)
    assert not report.notes


def test_fewer_bits_fewer_bytes_more_error(prose_small):
    errors, sizes = {}, {}
    for bits in (8, 6, 4, 3):
        loaded = tiny_llama()
        report = lmshrink.compress(loaded, lmshrink.Plan(method="svd", ratio=0.5, bits=bits), progress=False)
        errors[bits] = sum(r["quantization_error"] for r in report.compressed)
        sizes[bits] = report.bytes_after
    assert sizes[8] > sizes[6] > sizes[4] > sizes[3]
    assert errors[8] < errors[6] < errors[4] < errors[3]


def test_groupreduce_bits_option_is_plan_bits():
    from lmshrink.quantize_factors import reconcile_bits

    plan = reconcile_bits(lmshrink.Plan(method="groupreduce", targets=("embedding",), ratio=0.5, options={"bits": 4, "quant_group": 32}))
    assert (plan.bits, plan.group_size, plan.options) == (4, 32, {})
    assert reconcile_bits(lmshrink.Plan(method="quantize", ratio=1.0)).bits == 8  # the baseline's default width
    with pytest.raises(InvalidArgument, match="gives bits=8 and bits=4"):
        reconcile_bits(lmshrink.Plan(method="groupreduce", targets=("embedding",), ratio=0.5, bits=8, options={"bits": 4}))


# -- budgets ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("budget", [{"bytes": 60_000}, {"bf16_fraction": 0.3}, {"params": 40_000}], ids=["bytes", "bf16", "params"])
def test_budget_is_met_and_used(prose_small, budget):
    loaded = tiny_llama()
    original_params = count_params(loaded.model)
    recipe = parse_recipe({**budget, "stages": [
        {"targets": ["embedding", "lm_head"], "method": "groupreduce", "ratio": 0.5, "bits": 8, "groups": 4},
        {"targets": ["linears"], "method": "svd", "ratio": 1, "bits": 4, "group_size": 32}]})
    apply_recipe(loaded, recipe, prose_small, progress=False)
    record = loaded.recipe["budget"]
    limit = budget.get("bytes") or budget.get("params") or int(0.3 * 2 * original_params)
    assert record["limit"] == limit and record["met"] and record["measured"] <= limit
    assert record["measured"] > 0.9 * limit  # the budget is spent, not left unused
    if "params" not in budget:
        assert record["measured"] == count_bytes(loaded.model)
    # The shares keep their proportion: the embedding stage's ratio is half the linears' (until one reaches 1).
    applied = loaded.recipe["applied"]
    assert abs(applied[0]["ratio"] - 0.5 * applied[1]["ratio"]) < 1e-9


def test_builtin_half_meets_its_budget_on_a_tied_llama(prose_small):
    loaded = long_llama(tie=True)
    bf16 = 2 * count_params(loaded.model)
    reference = loaded.logits(torch.tensor([loaded.encode(prose_small.test)[:64]]))
    apply_recipe(loaded, "half", prose_small, progress=False)
    record = loaded.recipe["budget"]
    assert record["limit"] == bf16 // 2 and record["met"]
    assert count_bytes(loaded.model) == record["measured"] <= 0.5 * bf16
    # Every linear and the tied table are 6-bit integers (the table stored once, the head reading it).
    linears = [m for name, m in loaded.model.named_modules() if name.endswith(("_proj",))]
    assert linears and all(type(m).__name__ == "QuantizedLinear" and m.weight_q.bits == 6 for m in linears)
    assert type(loaded.model.model.embed_tokens).__name__ == "QuantizedEmbedding" and loaded.model.model.embed_tokens.weight_q.bits == 6
    assert type(loaded.model.lm_head).__name__ == "TiedHead"
    # 6 bits keep the logits close to the original's.
    after = loaded.logits(torch.tensor([loaded.encode(prose_small.test)[:64]]))
    assert torch.linalg.norm(after - reference) < 0.1 * torch.linalg.norm(reference)


def test_builtin_quarter_meets_its_budget_with_fewer_mlp_channels(prose_small):
    from lmshrink.layers.quantized import MixedBitsEmbedding

    loaded = long_llama(tie=True)
    bf16 = 2 * count_params(loaded.model)
    apply_recipe(loaded, "quarter", prose_small, progress=False)
    record = loaded.recipe
    budget = record["budget"]
    assert budget["limit"] == bf16 // 4 and budget["met"] and count_bytes(loaded.model) == budget["measured"]
    assert budget["margin"] == 0.0  # no sensitivity allocation: sizes are predicted exactly, the whole budget is usable
    attention, mlp, table = record["applied"]
    # No choice keeps every MLP channel within a quarter here: each list's last value (5 / 4 bits, half the table's
    # rows rare), the MLPs narrowed to fit, the budget spent.
    assert budget["chosen"] == [{"bits": 5}, {"bits": 4}, {"rare_share": 0.5}] and [attention["bits"], mlp["bits"]] == [5, 4]
    assert mlp["method"] == "nystrom" and 0.5 < mlp["ratio"] < 0.95 and budget["measured"] > 0.95 * budget["limit"]
    layer = loaded.model.model.layers[0]
    assert type(layer.self_attn.q_proj).__name__ == "QuantizedLinear" and layer.self_attn.q_proj.weight_q.bits == 5
    channels = layer.mlp.down_proj
    assert type(channels).__name__ == "QuantizedChannelLinear" and channels.bits == 4 and channels.in_features < channels.dense_features == 128
    embedding = loaded.model.model.embed_tokens
    assert isinstance(embedding, MixedBitsEmbedding) and (embedding.common_q.bits, embedding.rare_q.bits) == (4, 2)
    assert int(embedding.rare.sum()) == round(0.5 * 256)
    # With room for every channel at the most bits, the budget takes the first choice that keeps them all: 6-bit
    # attention, every MLP channel at 5 bits (as gptq would store them), 80% of the rows rare.
    roomy = load_recipe("quarter")
    roomy.bf16_fraction = 0.35
    loaded = long_llama(tie=True)
    reports = apply_recipe(loaded, roomy, prose_small, progress=False)
    assert loaded.recipe["budget"]["chosen"] == [{"bits": 6}, {"bits": 5}, {"rare_share": 0.8}]
    assert loaded.recipe["applied"][1]["ratio"] == 1.0
    assert loaded.recipe["budget"]["met"] and count_bytes(loaded.model) == loaded.recipe["budget"]["predicted"]
    down = loaded.model.model.layers[0].mlp.down_proj
    assert type(down).__name__ == "QuantizedLinear" and down.weight_q.bits == 5
    assert {row["rounding"] for row in reports[1].modules} == {"compensated"}


def test_a_budget_chooses_among_listed_widths(prose_small, tmp_path):
    """A stage's bits as a list: the budget takes the first widths, in the lists' order, that keep every stage at its
    full amount; when none do, each list's last width, amounts scaled. Saved recipes keep the lists."""
    from itertools import product

    from lmshrink.recipes import check_recipe

    def recipe(limit, attention=(6, 4), mlp=(5, 4)):
        return parse_recipe({"bytes": limit, "stages": [
            {"targets": ["attention"], "method": "gptq", "ratio": 1, "bits": list(attention) if len(attention) > 1 else attention[0], "group_size": 32},
            {"targets": ["mlp"], "method": "nystrom", "ratio": 1, "bits": list(mlp) if len(mlp) > 1 else mlp[0], "group_size": 32},
            {"targets": ["embedding", "lm_head"], "method": "gptq", "ratio": 1, "bits": 4, "group_size": 32}]})

    def full_size(attention, mlp):  # the fixed-width solution with a roomy budget: every stage at its full amount
        stages, solution = check_recipe(long_llama(tie=True), recipe(10**9, (attention,), (mlp,)))
        assert stages[1].ratio == 1.0
        return solution["predicted"]

    sizes = {pair: full_size(*pair) for pair in product((6, 4), (5, 4))}
    assert sizes[(6, 5)] == max(sizes.values()) and sizes[(4, 4)] == min(sizes.values())
    for limit in (sizes[(6, 5)], sizes[(6, 5)] - 1, sizes[(4, 4)]):
        stages, solution = check_recipe(long_llama(tie=True), recipe(limit))
        best = next(pair for pair in product((6, 4), (5, 4)) if sizes[pair] <= limit)  # the lists' order
        assert [solution["chosen"][0]["bits"], solution["chosen"][1]["bits"]] == list(best) and [p.bits for p in stages] == [*best, 4]
        assert stages[1].ratio == 1.0 and solution["predicted"] == sizes[best] <= limit
    # Below every full assignment: the fewest bits, and the MLPs narrowed to fit.
    stages, solution = check_recipe(long_llama(tie=True), recipe(sizes[(4, 4)] - 2000))
    assert solution["chosen"] == [{"bits": 4}, {"bits": 4}, {}] and stages[1].ratio < 1.0 and solution["predicted"] <= sizes[(4, 4)] - 2000
    # Applied: the chosen widths are what is stored, the budget is met, and the saved recipe keeps the lists.
    loaded = long_llama(tie=True)
    chosen = recipe(sizes[(6, 5)] - 1)
    apply_recipe(loaded, chosen, prose_small, progress=False)
    record = loaded.recipe
    assert record["budget"]["met"] and count_bytes(loaded.model) == record["budget"]["measured"] == record["budget"]["predicted"]
    assert [stage["bits"] for stage in record["applied"][:2]] == [choice["bits"] for choice in record["budget"]["chosen"][:2]]
    assert loaded.model.model.layers[0].self_attn.q_proj.weight_q.bits == record["budget"]["chosen"][0]["bits"]
    lmshrink.save(loaded, tmp_path / "saved")
    again = load_recipe(tmp_path / "saved")
    assert again.choices[:2] == [{"bits": (6, 4)}, {"bits": (5, 4)}] and again.to_dict()["stages"][0]["bits"] == [6, 4]
    with pytest.raises(InvalidArgument, match=r"recipe stage 1 bits: is a list \[6, 4\] but the recipe has no budget"):
        parse_recipe({"stages": [{"targets": ["attention"], "method": "gptq", "bits": [6, 4]}]})
    with pytest.raises(InvalidArgument, match=r"recipe stage 1 bits: \[6, 7\] is not a list of distinct allowed values"):
        parse_recipe({"bytes": 10**6, "stages": [{"targets": ["attention"], "method": "gptq", "bits": [6, 7]}]})
    with pytest.raises(InvalidArgument, match=r"recipe stage 1 rare_share: \[0.8, 1.5\] is not a list of distinct allowed values"):
        parse_recipe({"bytes": 10**6, "stages": [{"targets": ["embedding"], "method": "gptq", "rare_bits": 2, "rare_share": [0.8, 1.5]}]})
    with pytest.raises(InvalidArgument, match=r"recipe stage 1 \(svd\).*unknown key\(s\) \['rare_share'\]"):
        parse_recipe({"bytes": 10**6, "stages": [{"targets": ["embedding"], "method": "svd", "rare_share": [0.8, 0.5]}]})


# -- bad input: one line, nothing written ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    lmshrink.save(tiny_llama(), root / "llama")
    lmshrink.save(tiny_llama(tie=True), root / "tied")
    (root / "text.txt").write_text("hello world, this is a line of text with words in it\n" * 300)
    recipes = {
        "overlap.yaml": "stages:\n  - {targets: [linears], method: svd, ratio: 0.5}\n  - {targets: ['*.q_proj'], method: svd, ratio: 0.3}\n",
        "overlap_tied.yaml": "stages:\n  - {targets: [embedding], method: svd, ratio: 0.5}\n  - {targets: [lm_head], method: groupreduce, ratio: 0.3}\n",
        "unknown.yaml": "stages:\n  - {targets: [linears], method: svd, ratio: 0.5, bitz: 4}\n",
        "budget.yaml": "bytes: 1000\nstages:\n  - {targets: [linears], method: svd, ratio: 1, bits: 4}\n",
        "prune_bits.yaml": "stages:\n  - {targets: [linears], method: prune, ratio: 0.5, bits: 4}\n",
        "bad_bits.yaml": "stages:\n  - {targets: [linears], method: svd, ratio: 0.5, bits: 7}\n",
        "a.yaml": "name: low-rank\nstages:\n  - {targets: [linears], method: svd, ratio: 0.6, bits: 8}\n",
        "b.yaml": "name: gr+svd\nstages:\n  - {targets: [embedding], method: groupreduce, ratio: 0.5, bits: 6, groups: 4}\n"
                  "  - {targets: [linears], method: fwhiten, ratio: 0.5, bits: 4, group_size: 32, calibration_windows: 4, window: 32}\n",
    }
    for name, text in recipes.items():
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize("model,recipe,words", [
    ("llama", "overlap.yaml", ["stages 1 (svd on linears) and 2 (svd on *.q_proj) both target model.layers.0.self_attn.q_proj"]),
    ("tied", "overlap_tied.yaml", ["stages 1 (svd on embedding) and 2 (groupreduce on lm_head) both target model.embed_tokens (tied to lm_head)"]),
    ("llama", "unknown.yaml", ["recipe stage 1 (svd): has", "unknown key(s) ['bitz']", "ratio", "group_size", "allocation"]),
    ("llama", "budget.yaml", ["budget bytes: 1,000 is below what this recipe can reach", "the nearest feasible"]),
    ("llama", "prune_bits.yaml", ["--bits", "method 'prune' builds layers that cannot store quantized factors"]),
    ("llama", "bad_bits.yaml", ["recipe stage 1 (svd) bits: 7 bits is not supported", "(2, 3, 4, 5, 6, 8)"]),
    ("llama", "missing.yaml", ["--recipe: 'missing.yaml' is neither a file"]),
])
def test_bad_recipe_one_line_error_nothing_written(workspace, model, recipe, words):
    result = invoke_cli(workspace, "compress", model, "--recipe", recipe, "--data", "text.txt", "--tokens", "64", "--window", "16",
                    "--out", "out")
    line = one_error_line(result)
    for word in words:
        assert word in line, line
    assert not (workspace / "out").exists()


def test_infeasible_budget_names_a_budget_that_works(workspace, prose_small):
    loaded = tiny_llama()
    with pytest.raises(InvalidArgument) as caught:
        apply_recipe(loaded, load_recipe(workspace / "budget.yaml"), prose_small, progress=False)
    nearest = int(caught.value.problem.split("about ")[1].split(" ")[0].replace(",", ""))
    recipe = parse_recipe({"bytes": nearest, "stages": [{"targets": ["linears"], "method": "svd", "ratio": 1, "bits": 4}]})
    apply_recipe(loaded, recipe, prose_small, progress=False)
    assert loaded.recipe["budget"]["met"]


def test_recipe_flag_refuses_method_amounts(workspace):
    result = invoke_cli(workspace, "compress", "llama", "--recipe", "a.yaml", "--ratio", "0.5", "--data", "text.txt", "--out", "out")
    assert "--recipe: given with --ratio" in one_error_line(result)
    # What a stage says (targets, allocation) is never silently replaced nor dropped: typed with a recipe, refused.
    result = invoke_cli(workspace, "compress", "llama", "--recipe", "a.yaml", "--targets", "mlp", "--allocation", "sensitivity",
                        "--data", "text.txt", "--out", "out")
    assert "--recipe: given with --targets, --allocation" in one_error_line(result)
    assert not (workspace / "out").exists()


def test_typed_calibration_settings_apply_to_every_recipe_stage(workspace, tmp_path):
    result = invoke_cli(workspace, "compress", "llama", "--recipe", "b.yaml", "--calibration-windows", "3", "--data", "text.txt",
                        "--tokens", "256", "--window", "16", "--self-share", "0", "--out", str(tmp_path / "out"), "--json")
    assert result.exit_code == 0, result.stderr
    applied = json.loads(result.stdout)["recipe"]["applied"]
    assert [(stage["calibration_windows"], stage["window"], stage["self_share"]) for stage in applied] == [(3, 16, 0), (3, 16, 0)]  # b.yaml says 4 and 32
    untyped = invoke_cli(workspace, "compress", "llama", "--recipe", "b.yaml", "--data", "text.txt", "--tokens", "256",
                         "--window", "32", "--out", str(tmp_path / "plain"), "--json")  # --calibration-windows not typed
    assert untyped.exit_code == 0, untyped.stderr
    assert [stage.get("calibration_windows") for stage in json.loads(untyped.stdout)["recipe"]["applied"]][1] == 4


# -- CLI: compress --recipe / --bits, compare ------------------------------------------------------------------------

def test_cli_compress_with_recipe_then_reuse_saved_recipe(workspace, tmp_path):
    result = invoke_cli(workspace, "compress", "llama", "--recipe", "b.yaml", "--data", "text.txt", "--tokens", "256", "--window", "32",
                    "--out", str(tmp_path / "first"), "--json")
    assert result.exit_code == 0, result.stderr
    first = json.loads(result.stdout)
    assert first["recipe"]["name"] == "gr+svd" and first["bytes"]["after"] < first["bytes"]["before"] / 4
    assert {m["stage"] for m in first["modules"]} == {1, 2}
    again = invoke_cli(workspace, "compress", "tied", "--recipe", str(tmp_path / "first"), "--data", "text.txt", "--tokens", "256",
                   "--window", "32", "--out", str(tmp_path / "second"), "--json")
    assert again.exit_code == 0, again.stderr
    second = json.loads(again.stdout)
    assert second["recipe"]["stages"] == first["recipe"]["stages"]
    loaded = lmshrink.load(tmp_path / "second")
    assert type(loaded.model.lm_head).__name__ == "TiedHead"


def test_cli_bits_applies_to_any_method(workspace, tmp_path):
    result = invoke_cli(workspace, "compress", "llama", "--method", "svd", "--ratio", "0.5", "--bits", "4", "--quant-group", "16",
                    "--data", "text.txt", "--tokens", "64", "--window", "16", "--out", str(tmp_path / "q"), "--json")
    assert result.exit_code == 0, result.stderr
    layers = {m["layer"] for m in json.loads(result.stdout)["modules"]}
    assert layers == {"QuantizedLowRankLinear"}
    manifest = json.loads((tmp_path / "q" / "lmshrink.json").read_text())
    configs = [m["config"] for m in manifest["modules"].values()]
    assert all(c["bits"] == 4 and c["group_size"] == 16 for c in configs)


def test_cli_compare_writes_table_json_and_png(workspace, tmp_path):
    out = tmp_path / "frontier"
    result = invoke_cli(workspace, "compare", "llama", "--recipes", "a.yaml", "b.yaml", "--data", "text.txt", "--tokens", "256",
                    "--window", "32", "--out", str(out))
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["frontier.json", "frontier.md", "frontier.png"]
    data = json.loads((out / "frontier.json").read_text())
    names = [row["name"] for row in data["rows"]]
    assert names == ["a.yaml", "b.yaml", "quantize 8 bits", "quantize 4 bits"]
    by_name = {row["name"]: row for row in data["rows"]}
    assert by_name["quantize 4 bits"]["bytes"] < by_name["quantize 8 bits"]["bytes"] < data["original"]["bytes"]
    assert all(row["perplexity"] > 1 for row in data["rows"])
    table = (out / "frontier.md").read_text()
    assert "| original |" in table and "| b.yaml | recipe |" in table
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    assert Image.open(out / "frontier.png").size[0] >= 600


def test_frontier_plot_draws_a_family_as_one_line_by_bytes(tmp_path):
    from lmshrink.frontier import plot, recipe_series

    rows = [{"name": "gr 0.8 4-bit", "kind": "recipe", "family": "gr", "point": "0.8 4-bit", "bytes": 30e6, "perplexity": 40.0},
            {"name": "quantize 4 bits", "kind": "quantization alone", "bytes": 40e6, "perplexity": 38.0},
            {"name": "gr 0.5 4-bit", "kind": "recipe", "family": "gr", "point": "0.5 4-bit", "bytes": 20e6, "perplexity": 90.0},
            {"name": "half", "kind": "recipe", "bytes": 60e6, "perplexity": 30.0}]
    series = recipe_series(rows)
    assert {label: [r["name"] for r in members] for label, members in series.items()} == {
        "gr": ["gr 0.5 4-bit", "gr 0.8 4-bit"], "half": ["half"]}
    result = {"model": "m", "rows": rows, "original": {"bytes": 200e6, "bf16_bytes": 100e6, "perplexity": 29.0}}
    plot(result, tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_compare_bad_recipe_writes_nothing(workspace, tmp_path):
    out = tmp_path / "frontier"
    result = invoke_cli(workspace, "compare", "llama", "--recipes", "a.yaml", "overlap.yaml", "--data", "text.txt", "--tokens", "64",
                    "--window", "16", "--out", str(out))
    assert "both target" in one_error_line(result)
    assert not out.exists()

