"""The one compress pipeline (lmshrink.run_compress), --device/--dtype on every path, and the one save format
(sharded safetensors + index, also for small models; old single-file saves still load). Tiny random models, CPU;
the CUDA cases run where CUDA is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lmshrink
from lmshrink.cli import main
from lmshrink.errors import InvalidArgument
from lmshrink.pipeline import EvalOptions
from lmshrink.safefiles import file_digest
from tests.conftest import tiny_gpt2, tiny_llama

EVAL = EvalOptions(tokens=64, window=32, samples=False, speed=False)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
without_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny LLaMA as a Hugging Face directory (float32), with a byte tokenizer."""
    folder = tmp_path_factory.mktemp("hf") / "llama"
    loaded = tiny_llama()
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("the cat sat on the mat and the dog sat on the log, said the small brown bird.\n" * 300)
    return path


def ids():
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


def logits(loaded):
    with torch.no_grad():
        return loaded.logits(ids()).cpu()


def header_dtypes(folder: Path) -> dict[str, str]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    dtypes = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(folder / shard), "pt") as handle:
            dtypes.update({name: str(handle.get_slice(name).get_dtype()) for name in handle.keys()})
    return dtypes


def test_bf16_whole_model_round_trip_exact_and_half_the_bytes(llama_dir, text, tmp_path):
    plan = lmshrink.Plan(method="svd", ratio=0.5)
    half = lmshrink.run_compress(str(llama_dir), plan, str(text), dtype="bfloat16", evaluate=EVAL, out=tmp_path / "bf16")
    full = lmshrink.run_compress(str(llama_dir), plan, str(text), dtype="float32", evaluate=EVAL, out=tmp_path / "fp32")
    assert all(p.dtype == torch.bfloat16 for p in half.loaded.model.parameters())
    assert len(half.reports) == 1 and half.reports[0].compressed  # the linears were factorized in bf16
    again = lmshrink.load(tmp_path / "bf16")
    assert all(p.dtype == torch.bfloat16 for p in again.model.parameters())
    assert torch.equal(logits(again), logits(half.loaded))  # saved and loaded bit for bit
    dtypes = header_dtypes(tmp_path / "bf16")
    assert set(dtypes.values()) == {"BF16"} and "model.layers.0.mlp.up_proj.left" in dtypes
    assert set(header_dtypes(tmp_path / "fp32").values()) == {"F32"}
    sizes = [json.loads((tmp_path / name / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
             for name in ("bf16", "fp32")]
    assert sizes[0] * 2 == sizes[1]
    manifest = json.loads((tmp_path / "bf16" / "lmshrink.json").read_text())
    assert manifest["weights"] == {"layout": "sharded-safetensors", "dtype": "bfloat16"}
    # The factorization ran in float32 either way: the same ranks, and bf16 weights close to the float32 ones.
    assert [r["rank"] for r in half.modules] == [r["rank"] for r in full.modules]
    relative = torch.linalg.norm(logits(half.loaded).float() - logits(full.loaded)) / torch.linalg.norm(logits(full.loaded))
    assert 0 < relative < 0.05
    # to_dict is what compress --json prints: perplexity before and after, measured in bf16.
    summary = half.to_dict()
    assert summary["perplexity"]["after"] > 1 and summary["saved_to"] == str((tmp_path / "bf16").resolve())
    assert summary["tokens_per_s"] == {"before": None, "after": None} and summary["samples"] is None


def test_cli_whole_model_compress_with_dtype_bfloat16(llama_dir, text, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["compress", str(llama_dir), "--method", "svd", "--ratio", "0.5", "--dtype", "bfloat16",
                                       "--data", str(text), "--tokens", "64", "--window", "32", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["saved_to"] == str(out.resolve()) and report["perplexity"]["after"] > 1
    # Held in bf16 from loading on: two bytes per parameter before and after (the float32 checkpoint takes four).
    assert report["bytes"]["before"] == 2 * report["params"]["before"] and report["bytes"]["after"] == 2 * report["params"]["after"]
    assert json.loads((out / "lmshrink.json").read_text())["weights"]["dtype"] == "bfloat16"
    assert set(header_dtypes(out).values()) == {"BF16"}
    loaded = lmshrink.load(out, dtype="float32")  # cast on load when asked
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())


def test_auto_dtype_is_what_the_checkpoint_declares(llama_dir, tmp_path):
    half_dir = tmp_path / "half"
    model = tiny_llama().model.to(torch.bfloat16)
    model.save_pretrained(half_dir)
    tiny_llama().tokenizer.save_pretrained(half_dir)
    assert json.loads((half_dir / "config.json").read_text())["dtype"] == "bfloat16"
    assert lmshrink.load_model(half_dir).model.model.norm.weight.dtype == torch.float32  # default: as loaded
    declared = lmshrink.load_model(half_dir, dtype="auto").model
    assert {p.dtype for p in declared.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in lmshrink.load_model(llama_dir, dtype="auto").model.parameters()} == {torch.float32}
    from lmshrink.devices import DeclaredDtype

    assert DeclaredDtype(declared, Path("model.gguf")).declared_dtype() == torch.bfloat16  # a GGUF: bf16, as block by block


@without_cuda
@pytest.mark.parametrize("command", ["compress", "eval", "inspect"])
def test_device_cuda_is_refused_on_a_machine_without_it(llama_dir, text, tmp_path, command):
    out = tmp_path / "out"
    extra = {"compress": ["--method", "svd", "--out", str(out), "--data", str(text), "--tokens", "64", "--window", "32"],
             "eval": ["--data", str(text), "--tokens", "64", "--window", "32"], "inspect": []}[command]
    result = CliRunner().invoke(main, [command, str(llama_dir), "--device", "cuda", *extra])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --device: 'cuda' was asked but this machine has no CUDA device"), lines
    assert "allowed: cpu or auto" in lines[0] and "lmshrink [" not in result.stderr  # refused before any stage ran
    assert not out.exists()
    with pytest.raises(InvalidArgument, match="--device"):
        lmshrink.load_model(llama_dir, device="cuda")


def test_bad_dtype_in_python_is_one_line(llama_dir):
    with pytest.raises(InvalidArgument, match=r"--dtype: 'int8' is not supported; allowed: auto, float32, bfloat16, float16"):
        lmshrink.load_model(llama_dir, dtype="int8")


def test_saved_layout_is_sharded_with_an_index_and_tied_tensors_stored_once(tmp_path):
    loaded = tiny_gpt2(tie=True)
    lmshrink.compress(loaded, lmshrink.Plan(method="svd", ratio=0.5, targets=("linears",)), progress=False)
    folder = lmshrink.save(loaded, tmp_path / "m")
    names = sorted(p.name for p in folder.iterdir())
    assert "model-00001-of-00001.safetensors" in names and "model.safetensors.index.json" in names
    assert "model.safetensors" not in names
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00001.safetensors"}
    tied = {"transformer.wte.weight", "lm_head.weight"} & set(index["weight_map"])
    assert len(tied) == 1  # the tied embedding / head: one tensor, stored once
    manifest = json.loads((folder / "lmshrink.json").read_text())
    assert set(manifest["files"]) == {"model-00001-of-00001.safetensors", "model.safetensors.index.json"}
    again = lmshrink.load(folder)
    assert again.model.lm_head.weight is again.model.transformer.wte.weight
    assert torch.equal(logits(again), logits(loaded))
    # A larger model (or a small shard limit) spreads over several shards, read back the same.
    many = lmshrink.save(loaded, tmp_path / "many", max_shard_bytes=20_000)
    shards = sorted(p.name for p in many.glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[-1].endswith(f"-of-{len(shards):05d}.safetensors")
    assert torch.equal(logits(lmshrink.load(many)), logits(loaded))


def test_an_old_single_file_save_still_loads(tmp_path):
    loaded = tiny_llama()
    lmshrink.compress(loaded, lmshrink.Plan(method="svd", ratio=0.5), progress=False)
    folder = lmshrink.save(loaded, tmp_path / "old")
    # Rewrite it by hand as lmshrink wrote it before the sharded layout: one model.safetensors, its digest, no "weights".
    tensors = {}
    for shard in folder.glob("model-*.safetensors"):
        tensors.update(load_file(str(shard)))
        shard.unlink()
    (folder / "model.safetensors.index.json").unlink()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    manifest = json.loads((folder / "lmshrink.json").read_text())
    del manifest["weights"]
    manifest["files"] = {"model.safetensors": file_digest(folder / "model.safetensors")}
    (folder / "lmshrink.json").write_text(json.dumps(manifest))
    again = lmshrink.load(folder)
    assert torch.equal(logits(again), logits(loaded))
    assert lmshrink.load_model(str(folder)).manifest["files"].keys() == {"model.safetensors"}


def test_load_reads_each_header_once(tmp_path, monkeypatch):
    import lmshrink.io

    loaded = tiny_llama()
    folder = lmshrink.save(loaded, tmp_path / "m", max_shard_bytes=50_000)
    read = []
    original = lmshrink.io.safetensors_header
    monkeypatch.setattr(lmshrink.io, "safetensors_header", lambda path: read.append(Path(path).name) or original(path))
    lmshrink.load(folder)
    assert sorted(read) == sorted(p.name for p in folder.glob("model-*.safetensors")) and len(read) > 1


def test_stages_apply_in_order_and_the_result_sums_them(llama_dir, text, tmp_path):
    stages = [lmshrink.Plan(method="svd", ratio=0.5, targets=("mlp",)), lmshrink.Plan(method="svd", ratio=0.5, targets=("attention",))]
    seen = []
    result = lmshrink.run_compress(str(llama_dir), stages, str(text), evaluate=EVAL, on_stage=seen.append)
    assert [len(r.modules) for r in result.reports] == [6, 8]  # 2 blocks x (3 MLP, 4 attention) linears
    assert result.modules == [{**row, "stage": 1} for row in result.reports[0].modules] + [{**row, "stage": 2} for row in result.reports[1].modules]
    assert result.compression_seconds == pytest.approx(sum(r.seconds for r in result.reports))
    assert result.to_dict()["method"] == "svd+svd" and [p["targets"] for p in result.to_dict()["plan"]] == [["mlp"], ["attention"]]
    assert result.after["params"] < result.before["params"] and result.saved_to is None
    assert [s for s in seen if s.startswith("factorizing")] == ["factorizing 6 matrices (svd)", "factorizing 8 matrices (svd)"]
    with pytest.raises(InvalidArgument, match="stages given as a list; block by block, stages come as a Recipe"):
        lmshrink.run_compress(str(llama_dir), stages, str(text), sequential=True, out=tmp_path / "seq")


def test_eval_tasks_on_an_encoder_is_refused_before_loading(tmp_path, text, monkeypatch):
    import lmshrink.models

    folder = tmp_path / "bert"
    folder.mkdir()  # only a config: an encoder by its architectures; no weights, so loading it would fail otherwise
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"], "hidden_size": 32,
                                                    "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}))

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(lmshrink, "load_model", no_loading)
    monkeypatch.setattr(lmshrink.models, "load_model", no_loading)
    result = CliRunner().invoke(main, ["eval", str(folder), "--tasks", "hellaswag", "--data", str(text)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"error: --tasks: {str(folder)!r} is an encoder; allowed: a causal language model "
                     "(lm-eval scores next-token log-likelihoods)"]


@needs_cuda
def test_compress_and_eval_on_cuda(llama_dir, text, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["compress", str(llama_dir), "--method", "fwhiten", "--ratio", "0.5", "--device", "cuda",
                                       "--dtype", "bfloat16", "--calibration-windows", "2", "--window", "32",
                                       "--data", str(text), "--tokens", "64", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    on_cpu = lmshrink.run_compress(str(llama_dir), lmshrink.Plan(method="fwhiten", ratio=0.5, calibration_windows=2, window=32),
                                   str(text), dtype="bfloat16", evaluate=EvalOptions(tokens=64, window=32, samples=False, speed=False))
    assert [m["rank"] for m in report["modules"]] == [m["rank"] for m in on_cpu.modules]
    assert report["perplexity"]["after"] == pytest.approx(on_cpu.after["perplexity"], rel=0.05)
    evaluated = CliRunner().invoke(main, ["eval", str(out), "--device", "cuda", "--data", str(text), "--tokens", "64",
                                          "--window", "32", "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["perplexity"] == pytest.approx(report["perplexity"]["after"], rel=1e-3)
    loaded = lmshrink.load(out, device="cuda")
    assert loaded.device.type == "cuda" and loaded.model.model.layers[0].mlp.up_proj.left.dtype == torch.bfloat16


def test_an_encoder_is_measured_by_fidelity_and_never_sampled(tmp_path):
    from tests.test_hf_compat import tiny_bert

    text = tmp_path / "short.txt"  # sentences of 8+ words that fit the tiny encoder's 64 positions
    text.write_text("".join(f"the cat sat on mat {i} by the old door.\n" for i in range(400)))

    seen, bert = [], tiny_bert()
    bert.tokenizer.pad_token = bert.tokenizer.convert_ids_to_tokens(0)  # sentences of several lengths are padded
    result = lmshrink.run_compress(bert, lmshrink.Plan(method="svd", ratio=0.5), str(text), dtype="bfloat16",
                                   evaluate=EvalOptions(tokens=64, window=32, samples=True, speed=False), on_stage=seen.append)
    assert result.samples is None and not any(s.startswith("sampling") for s in seen)
    assert result.before["fidelity"]["cosine_mean"] == pytest.approx(1.0, abs=1e-6)  # the original against itself
    assert 0.2 < result.after["fidelity"]["cosine_mean"] < 1.0 and result.after["perplexity"] is None
    assert {p.dtype for p in result.loaded.model.parameters()} == {torch.bfloat16}
