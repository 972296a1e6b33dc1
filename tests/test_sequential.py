"""The block-by-block engine against the whole-model path, its Fisher, its output format, and its memory bound."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import lmshrink
from conftest import tiny_gemma3, tiny_gpt2, tiny_llama
from lmshrink.errors import CorruptFile, InvalidArgument
from lmshrink.evaluate import perplexity
from lmshrink.sequential import compress_sequential, exact_fisher, open_engine

WINDOWS, WINDOW = 6, 48


@pytest.fixture(autouse=True)
def _no_stats_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LMSHRINK_NO_STATS_CACHE", "1")


def _checkpoint(folder: Path, seed: int = 0, tie: bool = False, dtype=torch.float32) -> Path:
    loaded = tiny_llama(seed=seed, tie=tie)
    loaded.model.to(dtype).save_pretrained(folder, max_shard_size="60KB")
    loaded.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def corpus(prose):
    return lmshrink.Corpus(prose.name, prose.train[:200_000], prose.test[:40_000], prose.source)


def _plan(method: str, **kw) -> lmshrink.Plan:
    return lmshrink.Plan(method=method, ratio=kw.pop("ratio", 0.5), calibration_windows=WINDOWS, window=WINDOW, **kw)


def _whole(checkpoint, plan, corpus):
    loaded = lmshrink.load_model(checkpoint)
    report = lmshrink.compress(loaded, plan, data=corpus, progress=False)
    return loaded, report


def _ppl(loaded, corpus) -> float:
    ids = loaded.encode(corpus.test[:6000])
    return perplexity(loaded, ids, window=64, progress=False)["perplexity"]


def test_svd_gives_the_whole_model_factors_exactly(checkpoint, corpus, tmp_path):
    plan = _plan("svd")
    report = compress_sequential(checkpoint, plan, None, tmp_path / "seq", dtype="float32", device="cpu", progress=False)
    whole, whole_report = _whole(checkpoint, plan, corpus)
    saved = lmshrink.load(tmp_path / "seq")
    ours, theirs = saved.model.state_dict(), whole.model.state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert saved.manifest["modules"] == {k: v for k, v in lmshrink.io.manifest_of(whole)["modules"].items()}
    assert [r["rank"] for r in report.modules] == [r["rank"] for r in whole_report.modules] and len(report.compressed) == 14
    assert report.params_after == whole_report.params_after < report.params_before
    names = sorted(p.name for p in (tmp_path / "seq").iterdir())
    assert names[:2] == ["config.json", "lmshrink.json"] and "model-00001-of-00003.safetensors" in names  # outer + 2 blocks
    assert "model.safetensors.index.json" in names and not any(n.startswith(".") for n in names)


def test_energy_plan_allocates_per_block_like_the_whole_model(checkpoint, corpus, tmp_path):
    plan = lmshrink.Plan(method="svd", energy=0.9)
    report = compress_sequential(checkpoint, plan, None, tmp_path / "seq", dtype="float32", device="cpu", progress=False)
    _, whole_report = _whole(checkpoint, plan, corpus)
    assert [r["rank"] for r in report.modules] == [r["rank"] for r in whole_report.modules]
    assert any(r["rank"] for r in report.modules)


@pytest.mark.parametrize("method", ["svdllm", "fwhiten", "kfac"])
def test_calibrated_open_loop_matches_whole_model(checkpoint, corpus, tmp_path, method):
    plan = _plan(method)
    compress_sequential(checkpoint, plan, corpus, tmp_path / "seq", dtype="float32", device="cpu", calibrate_on="original",
                        progress=False)
    whole, _ = _whole(checkpoint, plan, corpus)
    saved = lmshrink.load(tmp_path / "seq")
    ours, theirs = saved.model.state_dict(), whole.model.state_dict()
    for name in ours:
        left, right = ours[name], theirs[name]
        assert torch.allclose(left, right, rtol=1e-4, atol=1e-5 * float(right.abs().max())), name
    a, b = _ppl(saved, corpus), _ppl(whole, corpus)
    assert abs(a - b) <= 1e-4 * b, (a, b)


def test_nystrom_block_by_block_keeps_the_whole_model_channels(checkpoint, corpus, tmp_path):
    from lmshrink.layers.channels import ChannelLinear

    plan = _plan("nystrom", ratio=0.75, targets=("mlp",))
    compress_sequential(checkpoint, plan, corpus, tmp_path / "open", dtype="float32", device="cpu", calibrate_on="original",
                        progress=False)
    whole, whole_report = _whole(checkpoint, plan, corpus)
    saved = lmshrink.load(tmp_path / "open")
    for index, layer in enumerate(saved.model.model.layers):
        ours, theirs = layer.mlp.down_proj, whole.model.model.layers[index].mlp.down_proj
        assert isinstance(ours, ChannelLinear) and ours.weight.shape == (64, 96)
        assert torch.equal(ours.kept, theirs.kept)  # exact Fisher and input Grams: the same elimination
        assert torch.allclose(ours.weight, theirs.weight, rtol=1e-4, atol=1e-5 * float(theirs.weight.detach().abs().max()))
    a, b = _ppl(saved, corpus), _ppl(whole, corpus)
    assert abs(a - b) <= 1e-4 * b, (a, b)
    # Closed loop: the second block chooses its channels on what the narrowed first block gives it.
    report = compress_sequential(checkpoint, plan, corpus, tmp_path / "closed", dtype="float32", device="cpu", progress=False)
    assert len(report.compressed) == 6 and report.params_after == whole_report.params_after < report.params_before
    closed = lmshrink.load(tmp_path / "closed")
    assert torch.equal(closed.model.model.layers[0].mlp.down_proj.kept, saved.model.model.layers[0].mlp.down_proj.kept)
    assert _ppl(closed, corpus) < 2 * b
    for extra, flag in (({"allocation": "sensitivity"}, "--allocation"), ({}, "--refit")):
        with pytest.raises(InvalidArgument, match=flag):
            compress_sequential(checkpoint, _plan("nystrom", ratio=0.75, targets=("mlp",), **extra), corpus, tmp_path / "out",
                                device="cpu", progress=False, refit=flag == "--refit")
    assert not (tmp_path / "out").exists()


def test_calibration_sampled_from_the_model_is_the_same_block_by_block(checkpoint, corpus, tmp_path):
    """'TEXT+self': the engine loads the whole model once to sample, and samples what the whole-model path samples."""
    mixed = lmshrink.Corpus(corpus.name + "+self", corpus.train, corpus.test, corpus.source, sampled=0.5)
    plan = _plan("svdllm")
    compress_sequential(checkpoint, plan, mixed, tmp_path / "seq", dtype="float32", device="cpu", calibrate_on="original",
                        progress=False)
    whole, _ = _whole(checkpoint, plan, mixed)
    text_only, _ = _whole(checkpoint, plan, corpus)
    ours, theirs, other = lmshrink.load(tmp_path / "seq").model.state_dict(), whole.model.state_dict(), text_only.model.state_dict()
    for name in ours:
        assert torch.allclose(ours[name], theirs[name], rtol=1e-4, atol=1e-5 * float(theirs[name].abs().max())), name
    assert any(not torch.allclose(theirs[name], other[name]) for name in theirs)  # the samples did change the factors


def test_gemma3_fits_the_block_seam(corpus, tmp_path):
    """Per-layer attention types (sliding and full masks, two rotary tables), a scaled embedding, soft-capped logits."""
    folder = tiny_gemma3(tmp_path / "gemma")
    plan = _plan("fwhiten")
    compress_sequential(folder, plan, corpus, tmp_path / "seq", dtype="float32", device="cpu", calibrate_on="original", progress=False)
    whole, _ = _whole(folder, plan, corpus)
    saved = lmshrink.load(tmp_path / "seq")
    ours, theirs = saved.model.state_dict(), whole.model.state_dict()
    assert set(ours) == set(theirs) and any(k.endswith(".left") for k in ours)
    for name in ours:
        assert torch.allclose(ours[name], theirs[name], rtol=1e-4, atol=1e-5 * float(theirs[name].abs().max())), name
    ids = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        assert torch.allclose(saved.model(input_ids=ids).logits, whole.model(input_ids=ids).logits, atol=1e-4)


@pytest.mark.parametrize("stat,method,chunk", [("fisher", "fwhiten", None), ("output_grad_gram", "kfac", None), ("fisher", "fwhiten", 5)])
def test_exact_gradient_statistics_equal_the_in_memory_ones(checkpoint, corpus, tmp_path, monkeypatch, stat, method, chunk):
    """The block-wise backward pass gives what the whole-model calibration measures: the Fisher (out, in) and the
    output-gradient Gram (out, out, float64); only the statistic asked for is kept. With ``chunk`` the loss's logits
    are made that many positions at a time (ten chunks a window here), as a large vocabulary's are."""
    from safetensors.torch import load_file

    import lmshrink.models.blocks as blocks
    from lmshrink.calibration import collect_stats
    from lmshrink.plan import select_targets

    if chunk is not None:
        monkeypatch.setattr(blocks, "LOGIT_CHUNK", chunk)
        assert len(list(blocks.DecoderStack.logit_chunks(None, WINDOW - 1, "cpu"))) == 10
    plan = _plan(method)
    engine = open_engine(checkpoint, plan, "float32", "cpu", progress=False)
    engine.load_outer()
    windows, first_inputs, calls = engine.calibrate(corpus, WINDOWS, WINDOW)
    exact_fisher(engine, windows, first_inputs, calls, tmp_path, needs={stat})
    assert {p.name.rsplit("-", 1)[0] for p in tmp_path.iterdir()} == {stat}
    ours = {}
    for index in range(len(engine.stack)):
        ours.update(load_file(str(tmp_path / f"{stat}-{index}.safetensors")))
    whole = lmshrink.load_model(checkpoint)
    targets = select_targets(whole.candidates(), plan.targets)
    theirs = collect_stats(whole, targets, corpus, {stat}, WINDOWS, WINDOW, progress=False, cache=False)
    assert set(ours) == {t.name for t in targets} and len(ours) == 14
    for target in targets:
        value, reference = ours[target.name], theirs[target.name][stat]
        if stat == "output_grad_gram":
            assert value.shape == (target.shape[0], target.shape[0]) and value.dtype == torch.float64
        assert float(reference.abs().max()) > 0
        assert torch.allclose(value, reference, rtol=1e-4, atol=1e-6 * float(reference.abs().max())), target.name


def test_closed_loop_calibrates_on_compressed_activations(checkpoint, corpus, tmp_path):
    plan = _plan("svdllm", ratio=0.3)
    compress_sequential(checkpoint, plan, corpus, tmp_path / "open", dtype="float32", device="cpu", calibrate_on="original", progress=False)
    compress_sequential(checkpoint, plan, corpus, tmp_path / "closed", dtype="float32", device="cpu", progress=False)
    opened, closed = lmshrink.load(tmp_path / "open"), lmshrink.load(tmp_path / "closed")
    a, b = opened.model.state_dict(), closed.model.state_dict()
    first = [k for k in a if k.startswith("model.layers.0.")]
    second = [k for k in a if k.startswith("model.layers.1.") and k.endswith(".left")]
    assert all(torch.equal(a[k], b[k]) for k in first)  # block 0 sees the same (embedding) inputs either way
    assert not any(torch.allclose(a[k], b[k]) for k in second)  # block 1 sees what compressed block 0 produces
    assert closed.manifest["compression"][0]["rank"] == opened.manifest["compression"][0]["rank"]
    assert _ppl(closed, corpus) < float("inf")


def test_offloaded_activations_give_the_same_result(checkpoint, corpus, tmp_path):
    from lmshrink.sequential import Boundary

    boundary = Boundary(tmp_path, limit=100)
    tensors = [torch.randn(1, 5, 4), torch.randn(1, 5, 4), torch.randn(1, 5, 4)]
    for tensor in tensors:
        boundary.append(tensor)
    assert boundary.offloaded == 2 and len(list(tmp_path.glob("activation-*"))) == 2
    assert all(torch.equal(a, b) for a, b in zip(boundary, tensors))
    del boundary
    assert not list(tmp_path.glob("activation-*"))

    plan = _plan("fwhiten")
    compress_sequential(checkpoint, plan, corpus, tmp_path / "memory", dtype="float32", device="cpu", progress=False)
    compress_sequential(checkpoint, plan, corpus, tmp_path / "disk", dtype="float32", device="cpu", progress=False, offload_bytes=0)
    a, b = lmshrink.load(tmp_path / "memory").model.state_dict(), lmshrink.load(tmp_path / "disk").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["fwhiten", "kfac"])
def test_sensitivity_allocation_meets_the_budget_like_the_whole_model(checkpoint, corpus, tmp_path, method):
    plan = _plan(method, ratio=0.6, allocation="sensitivity")
    report = compress_sequential(checkpoint, plan, corpus, tmp_path / "seq", dtype="float32", device="cpu",
                                 calibrate_on="original", progress=False)
    _, whole_report = _whole(checkpoint, plan, corpus)
    ranks = [r["rank"] for r in report.modules]
    assert ranks == [r["rank"] for r in whole_report.modules] and len(set(ranks)) > 1
    budget = int(0.6 * sum(r["shape"][0] * r["shape"][1] for r in report.modules))
    assert sum(r["params_after"] for r in report.modules) <= budget


def test_bf16_round_trip_and_half_the_bytes(checkpoint, corpus, tmp_path):
    whole = lmshrink.load_model(checkpoint)
    lmshrink.compress(whole, _plan("svd"), progress=False)
    for param in whole.model.parameters():  # parameters only: rotary frequencies stay float32, as in a bf16-built model
        param.data = param.data.bfloat16()
    lmshrink.save(whole, tmp_path / "bf16")
    again = lmshrink.load(tmp_path / "bf16")
    assert all(p.dtype == torch.bfloat16 for p in again.model.parameters())
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        assert torch.equal(again.model(input_ids=ids).logits, whole.model(input_ids=ids).logits)
    compress_sequential(checkpoint, _plan("svd"), None, tmp_path / "seq16", dtype="bfloat16", device="cpu", progress=False)
    compress_sequential(checkpoint, _plan("svd"), None, tmp_path / "seq32", dtype="float32", device="cpu", progress=False)

    def size(folder):
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        return index["metadata"]["total_size"]

    assert size(tmp_path / "seq16") * 2 == size(tmp_path / "seq32")
    assert json.loads((tmp_path / "seq16" / "lmshrink.json").read_text())["weights"]["dtype"] == "bfloat16"
    assert lmshrink.load(tmp_path / "seq16").model.model.layers[0].mlp.up_proj.left.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_quantized_factors_block_by_block_equal_the_whole_model_ones(checkpoint, corpus, tmp_path, dtype):
    """--bits with --sequential: each block's factors are quantized before the next block is calibrated; for svd
    (data-free) they are the whole-model path's exactly, and the k-bit scales stay float16 in any working dtype."""
    from safetensors import safe_open

    plan = _plan("svd", bits=4, group_size=16)
    report = compress_sequential(checkpoint, plan, corpus, tmp_path / "out", dtype=dtype, device="cpu", progress=False)
    whole, expected = _whole(checkpoint, plan, corpus)
    assert report.bytes_after == expected.bytes_after if dtype == "float32" else report.bytes_after < expected.bytes_after
    assert [r["layer"] for r in report.modules] == ["QuantizedLowRankLinear"] * 14
    again = lmshrink.load(tmp_path / "out")
    ours, theirs = again.model.state_dict(), whole.model.state_dict()
    packed = [k for k in theirs if k.endswith(".packed")]
    assert len(packed) == 28 and (dtype != "float32" or all(torch.equal(ours[k], theirs[k]) for k in packed))  # bf16: factors rounded first
    scales = {}
    for shard in (tmp_path / "out").glob("model-*.safetensors"):
        with safe_open(str(shard), "pt") as opened:
            scales.update({k: opened.get_slice(k).get_dtype() for k in opened.keys() if k.endswith(".scales")})
    assert len(scales) == 28 and set(scales.values()) == {"F16"}
    assert _ppl(again, corpus) < 1.5 * _ppl(lmshrink.load_model(checkpoint), corpus)


def test_auto_dtype_is_the_checkpoint_dtype(tmp_path, corpus):
    folder = _checkpoint(tmp_path / "half", dtype=torch.bfloat16)
    report = compress_sequential(folder, _plan("svdllm"), corpus, tmp_path / "out", progress=False)
    assert report.plan["dtype"] == "bfloat16" and report.plan["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == report.bytes_after


_CHILD = textwrap.dedent("""
    import resource, sys
    import torch
    import lmshrink
    import transformers.models.llama.modeling_llama  # imported before measuring, as everything below is
    from transformers import AutoConfig, AutoTokenizer
    from lmshrink.sequential import compress_sequential
    path, mode, out, headroom = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    def vm_data():
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmData")).split()[1]) * 1024
    if torch.cuda.is_available():  # the CUDA context's own mappings (made at its first use) are not the model's memory
        torch.zeros(1, device="cuda")
    # Nor are the thread pool's stacks (8 MiB each, counted by RLIMIT_DATA): two threads, started before measuring.
    torch.set_num_threads(2)
    torch.ones(256, 256) @ torch.ones(256, 256)
    limit = vm_data() + headroom
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    plan = lmshrink.Plan(method="rsvd", rank=16)
    try:
        if mode == "sequential":
            compress_sequential(path, plan, None, out, device="cpu", progress=False)
        else:
            loaded = lmshrink.load_model(path)
            lmshrink.compress(loaded, plan, progress=False)
    except (MemoryError, RuntimeError, OSError) as error:
        print("FAILED", type(error).__name__, str(error).splitlines()[0][:200])
        sys.exit(3)
    print("DONE")
""")


def test_block_by_block_runs_under_a_memory_limit_smaller_than_the_weights(tmp_path):
    from transformers import LlamaConfig

    from conftest import byte_tokenizer
    from lmshrink.models.blocks import build_skeleton
    from lmshrink.shards import ShardWriter

    config = LlamaConfig(hidden_size=1024, intermediate_size=3072, num_hidden_layers=10, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=512, max_position_embeddings=128, dtype="bfloat16")  # 10 blocks of 27 MB
    folder = tmp_path / "big"
    writer = ShardWriter(folder, torch.bfloat16, max_shard_bytes=40 << 20)
    generator = torch.Generator().manual_seed(0)
    weight_bytes = 0
    for name, tensor in build_skeleton(config, torch.bfloat16).state_dict().items():  # random weights, written as made
        weight_bytes += tensor.numel() * 2
        writer.add({name: torch.randn(tensor.shape, generator=generator, dtype=torch.bfloat16) * 0.02 + (1 if "norm" in name else 0)})
    writer.close()
    config.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    headroom = weight_bytes // 2  # the process may grow by half the bf16 weights
    # glibc's adaptive mmap threshold keeps freed blocks in the heap (fragmentation grows the process by ~100 MB here);
    # a fixed threshold returns big buffers to the OS, so what is measured is what the code holds. Same for both paths.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(lmshrink.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
           "MALLOC_MMAP_THRESHOLD_": "65536"}

    def child(mode):
        return subprocess.run([sys.executable, "-c", _CHILD, str(folder), mode, str(tmp_path / "out"), str(headroom)],
                              capture_output=True, text=True, env=env, timeout=300)

    done = child("sequential")
    assert done.returncode == 0 and "DONE" in done.stdout, done.stdout + done.stderr[-2000:]
    assert lmshrink.load(tmp_path / "out").model.model.layers[9].mlp.down_proj.rank == 16
    failed = child("whole")
    assert failed.returncode == 3 and "FAILED" in failed.stdout, failed.stdout + failed.stderr[-2000:]


def test_bad_input_fails_cleanly_with_nothing_written(checkpoint, corpus, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    victim = sorted(broken.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CorruptFile, match=victim.name):
        compress_sequential(broken, _plan("svd"), None, tmp_path / "out", device="cpu", progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(InvalidArgument, match="--out: .* exists and is not empty"):
        compress_sequential(checkpoint, _plan("svd"), None, taken, device="cpu", progress=False)
    assert sorted(p.name for p in taken.iterdir()) == ["notes.txt"]

    gpt2 = tmp_path / "gpt2"
    tiny_gpt2().model.save_pretrained(gpt2)
    with pytest.raises(InvalidArgument, match=r"--sequential: model type 'gpt2' has no decoder-block stack.*llama"):
        compress_sequential(gpt2, _plan("svd"), None, tmp_path / "out", device="cpu", progress=False)
    with pytest.raises(InvalidArgument, match="--targets: .*embed_tokens.* outside the decoder blocks"):
        compress_sequential(checkpoint, _plan("svd", targets=("embedding",)), None, tmp_path / "out", device="cpu", progress=False)
    with pytest.raises(InvalidArgument, match="--method: 'tt' builds its own modules for embedding only"):
        compress_sequential(checkpoint, _plan("tt"), None, tmp_path / "out", device="cpu", progress=False)
    with pytest.raises(InvalidArgument, match="--calibrate-on"):
        compress_sequential(checkpoint, _plan("svd"), None, tmp_path / "out", calibrate_on="teacher", progress=False)
    with pytest.raises(InvalidArgument, match="--dtype: 'int8'"):
        compress_sequential(checkpoint, _plan("svd"), None, tmp_path / "out", dtype="int8", device="cpu", progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_names_the_device_option(checkpoint, tmp_path):
    with pytest.raises(InvalidArgument, match=r"^--device: 'cuda' was asked but this machine has no CUDA device.*allowed: cpu or auto"):
        compress_sequential(checkpoint, _plan("svd"), None, tmp_path / "out", device="cuda", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["svdllm", "fwhiten"])
def test_cuda_matches_cpu(checkpoint, corpus, tmp_path, method):
    plan = _plan(method)
    compress_sequential(checkpoint, plan, corpus, tmp_path / "cpu", dtype="float32", device="cpu", progress=False)
    report = compress_sequential(checkpoint, plan, corpus, tmp_path / "gpu", dtype="float32", device="cuda", progress=False)
    assert report.plan["device"].startswith("cuda")
    a, b = _ppl(lmshrink.load(tmp_path / "cpu"), corpus), _ppl(lmshrink.load(tmp_path / "gpu"), corpus)
    assert abs(a - b) <= 1e-3 * a, (a, b)
    compress_sequential(checkpoint, plan, corpus, tmp_path / "bf16", dtype="bfloat16", device="cuda", progress=False)
    c = _ppl(lmshrink.load(tmp_path / "bf16", dtype=torch.float32), corpus)
    assert abs(c - a) <= 0.05 * a, (a, c)


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "lmshrink", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "LMSHRINK_NO_STATS_CACHE": "1"})


def test_cli_sequential_writes_a_model_that_loads_and_reports_it(checkpoint, corpus, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(corpus.train[:60_000])
    done = _cli("compress", checkpoint, "--sequential", "--method", "svdllm", "--ratio", "0.5", "--dtype", "bfloat16",
                "--calibrate-on", "original", "--refit", "--data", text, "--calibration-windows", 2, "--window", 32, "--tokens", 128,
                "--out", tmp_path / "out", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["plan"]["executor"] == "sequential" and result["plan"]["dtype"] == "bfloat16"
    assert result["plan"]["calibrate_on"] == "original" and result["plan"]["refit"] is True
    assert all(m["output_error"] <= m["output_error_before_refit"] for m in result["modules"])
    again = lmshrink.load(tmp_path / "out")
    assert all(p.dtype == torch.bfloat16 for p in again.model.parameters())
    assert sum(m["status"] == "factorized" for m in result["modules"]) == 14
    assert result["params"]["after"] < result["params"]["before"] and 1 < result["perplexity"]["after"] < 1e4
    assert result["on_disk"]["saved"] < result["on_disk"]["source"]  # bf16 factors vs float32 dense shards


@pytest.mark.parametrize("path", [[], ["--sequential"]])
def test_cli_kfac_with_sensitivity_meets_the_budget_on_both_paths(checkpoint, corpus, tmp_path, path):
    text = tmp_path / "text.txt"
    text.write_text(corpus.train[:60_000])
    done = _cli("compress", checkpoint, *path, "--method", "kfac", "--ratio", "0.5", "--allocation", "sensitivity", "--grad-damping", "0.01",
                "--data", text, "--calibration-windows", 2, "--window", 32, "--tokens", 128, "--out", tmp_path / "out", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["plan"]["method"] == "kfac" and result["plan"]["options"]["grad_damping"] == 0.01
    modules = result["modules"]
    assert sum(m["status"] == "factorized" for m in modules) >= 10 and len({m["rank"] for m in modules}) > 2
    assert sum(m["params_after"] for m in modules) <= int(0.5 * sum(m["shape"][0] * m["shape"][1] for m in modules))
    assert 1 < result["perplexity"]["after"] < 1e4
    assert lmshrink.load(tmp_path / "out").manifest["compression"][0]["rank"] == modules[0]["rank"]


@pytest.mark.parametrize("args,flag", [(["--sequential", "--no-save"], "--no-save"),
                                       (["--sequential", "--finetune-steps", "2"], "--finetune-steps"),
                                       (["--refit", "--untie-head"], "--untie-head"),
                                       (["--calibrate-on", "original", "--untie-head"], "--untie-head")])
def test_cli_flags_the_block_engine_does_not_run_are_refused(checkpoint, tmp_path, args, flag):
    done = _cli("compress", checkpoint, "--method", "svd", "--ratio", "0.5", *args, "--out", tmp_path / "out", cwd=tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {flag}:"), done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage,needle", [
    ("shard-outside", "outside the directory"), ("tensor-nowhere", "no shard holds"), ("shard-missing", "cannot be read"),
    ("shard-truncated", "truncated or corrupted"), ("tensor-misplaced", "places elsewhere")])
def test_damaged_sharded_save_is_refused_in_one_line(checkpoint, tmp_path, damage, needle):
    """The shard index is a file lmshrink.load reads from an untrusted directory, like the manifest (issue: hostile inputs)."""
    compress_sequential(checkpoint, _plan("svd"), None, tmp_path / "out", dtype="float32", device="cpu", progress=False)
    folder = tmp_path / "out"
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    if damage == "shard-outside":
        index["weight_map"][next(iter(index["weight_map"]))] = "../" + shards[0]
    elif damage == "tensor-nowhere":
        index["weight_map"]["model.extra.weight"] = shards[0]
    elif damage == "shard-missing":
        (folder / shards[-1]).unlink()
    elif damage == "shard-truncated":
        (folder / shards[-1]).write_bytes((folder / shards[-1]).read_bytes()[:-64])
    else:
        first, second = sorted(index["weight_map"].items(), key=lambda item: item[1])[:: len(index["weight_map"]) - 1]
        index["weight_map"][first[0]] = second[1]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CorruptFile, match=needle) as error:
        lmshrink.load(folder, verify=False)  # the structure checks themselves, not only the digests
    assert "\n" not in str(error.value)
    with pytest.raises(CorruptFile):
        lmshrink.load(folder)


def test_a_recipe_block_by_block_compresses_the_embedding_first_and_meets_its_budget(corpus, tmp_path):
    """Embedding stage (groupreduce, 8-bit) outside the blocks, linears (svdllm, refit) inside them; a byte budget.
    The blocks calibrate on the compressed embedding; the rows say their stage; the budget is met."""
    from conftest import tiny_gemma3
    from lmshrink.recipes import parse_recipe

    folder = tiny_gemma3(tmp_path / "gemma")
    original = lmshrink.load_model(folder)
    dense_bytes = sum(p.numel() * p.element_size() for p in original.model.parameters())
    recipe = parse_recipe({"stages": [{"targets": ["linears"], "method": "svdllm", "ratio": 0.6, "calibration_windows": WINDOWS,
                                       "window": WINDOW},
                                      {"targets": ["embedding"], "method": "groupreduce", "ratio": 0.5, "bits": 8}],
                           "bytes": int(0.55 * dense_bytes)})
    report = compress_sequential(folder, recipe, corpus, tmp_path / "out", dtype="float32", device="cpu", progress=False, refit=True)
    assert [row["stage"] for row in report.modules] == [1] * 21 + [2]
    assert report.modules[-1]["layer"].startswith("BlockLowRankEmbedding") or "GroupReduce" in report.modules[-1]["layer"]
    saved = lmshrink.load(tmp_path / "out")
    budget = saved.manifest["recipe"]["budget"]
    assert budget["met"] and budget["measured"] <= int(0.55 * dense_bytes)
    assert [s["method"] for s in saved.manifest["recipe"]["applied"]] == ["svdllm", "groupreduce"]
    layer = saved.model.model.embed_tokens
    ids = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        assert torch.allclose(layer(ids), layer.dense_weight()[ids] * 8.0, atol=1e-5)  # Gemma's embedding scale kept
    assert _ppl(saved, corpus) < 3 * _ppl(original, corpus)

    # The same recipe on the whole-model path picks the same stages and ranks (open loop: the same first block).
    whole = lmshrink.load_model(folder)
    from lmshrink.recipes import apply_recipe

    reports = apply_recipe(whole, recipe, corpus, progress=False)
    assert [r["rank"] for r in reports[0].modules] == [r["rank"] for r in report.modules[:21]]


def test_two_stages_inside_the_blocks_share_one_calibration_pass(checkpoint, corpus, tmp_path):
    """The channels recipe's shape block by block: nystrom on the MLPs, a low-rank method on attention."""
    from lmshrink.layers.channels import ChannelLinear
    from lmshrink.layers.lowrank import LowRankLinear
    from lmshrink.recipes import apply_recipe, parse_recipe

    stages = [{"targets": ["mlp"], "method": "nystrom", "ratio": 0.75, "calibration_windows": WINDOWS, "window": WINDOW},
              {"targets": ["attention"], "method": "svdllm", "ratio": 0.5, "calibration_windows": WINDOWS, "window": WINDOW}]
    report = compress_sequential(checkpoint, parse_recipe({"stages": stages}), corpus, tmp_path / "open", dtype="float32",
                                 device="cpu", calibrate_on="original", progress=False)
    assert [row["stage"] for row in report.modules] == [1] * 6 + [2] * 8
    whole = lmshrink.load_model(checkpoint)
    apply_recipe(whole, parse_recipe({"stages": stages}), corpus, progress=False)
    saved = lmshrink.load(tmp_path / "open")
    for ours, theirs in zip(saved.model.model.layers, whole.model.model.layers):
        assert isinstance(ours.mlp.up_proj, ChannelLinear) and torch.equal(ours.mlp.up_proj.kept, theirs.mlp.up_proj.kept)
        assert isinstance(ours.self_attn.q_proj, LowRankLinear)
    # Block 0's attention sees the same inputs on both paths (the whole-model stage 2 runs after stage 1 narrowed the
    # MLPs, which changes block 1's inputs there, not block 0's).
    ours, theirs = saved.model.model.layers[0].self_attn.o_proj, whole.model.model.layers[0].self_attn.o_proj
    with torch.no_grad():
        assert torch.allclose(ours.dense_weight(), theirs.dense_weight(), rtol=1e-4, atol=1e-5 * float(theirs.dense_weight().abs().max()))
    # Under a budget, with a sensitivity allocation in the low-rank stage, closed loop: the budget is met.
    budgeted = parse_recipe({"params": int(0.8 * whole_params(checkpoint)),
                             "stages": [stages[0], {**stages[1], "method": "fwhiten", "allocation": "sensitivity"}]})
    compress_sequential(checkpoint, budgeted, corpus, tmp_path / "budget", dtype="float32", device="cpu", progress=False)
    record = lmshrink.load(tmp_path / "budget").manifest["recipe"]["budget"]
    assert record["met"] and record["measured"] <= int(0.8 * whole_params(checkpoint))


def test_gptq_in_the_blocks_and_on_the_tied_table_after_them(corpus, tmp_path, monkeypatch):
    """gptq inside the blocks (open loop: what the whole-model path rounds), and a gptq stage on the tied table run
    after the blocks, weighed by the final hidden states (blocks left dense: the whole-model recipe's table)."""
    from lmshrink.layers.quantized import QuantizedEmbedding, QuantizedLinear
    from lmshrink.recipes import apply_recipe, parse_recipe

    import lmshrink.models.blocks as blocks

    monkeypatch.setattr(blocks, "LOGIT_CHUNK", 7)  # the table's inputs seen a few positions at a time: the same sums
    folder = _checkpoint(tmp_path / "tied", tie=True)
    gptq = {"method": "gptq", "ratio": 1, "bits": 4, "group_size": 16, "calibration_windows": WINDOWS, "window": WINDOW}

    def same_integers(ours, theirs) -> bool:  # float64 Grams from two routes: a rare rounding may flip
        return float((ours.dense_weight() != theirs.dense_weight()).float().mean()) < 0.01

    dense_blocks = parse_recipe({"stages": [{"targets": ["linears"], "method": "svd", "ratio": 1.0, "calibration_windows": WINDOWS,
                                             "window": WINDOW},
                                            {"targets": ["embedding", "lm_head"], **gptq, "bits": 3}]})
    report = compress_sequential(folder, dense_blocks, corpus, tmp_path / "table", dtype="float32", device="cpu", progress=False)
    assert report.modules[-1]["stage"] == 2 and report.modules[-1]["layer"] == "QuantizedEmbedding"
    whole = lmshrink.load_model(folder)
    apply_recipe(whole, dense_blocks, corpus, progress=False)
    saved = lmshrink.load(tmp_path / "table")
    ours, theirs = saved.model.model.embed_tokens, whole.model.model.embed_tokens
    assert isinstance(ours, QuantizedEmbedding) and ours.weight_q.bits == 3 and same_integers(ours, theirs)
    rounded = QuantizedEmbedding.from_embedding(lmshrink.load_model(folder).model.model.embed_tokens, 3, 16)
    assert not same_integers(ours, rounded)  # compensated, not rounded to nearest
    assert type(saved.model.lm_head).__name__ == "TiedHead"

    recipe = parse_recipe({"stages": [{"targets": ["linears"], **gptq}, {"targets": ["embedding", "lm_head"], **gptq, "bits": 3}]})
    compress_sequential(folder, recipe, corpus, tmp_path / "open", dtype="float32", device="cpu", calibrate_on="original", progress=False)
    whole = lmshrink.load_model(folder)
    apply_recipe(whole, recipe, corpus, progress=False)
    saved = lmshrink.load(tmp_path / "open")
    for ours, theirs in zip(saved.model.model.layers, whole.model.model.layers):
        for name in ("self_attn.q_proj", "mlp.down_proj"):
            mine = ours.get_submodule(name)
            assert isinstance(mine, QuantizedLinear) and same_integers(mine, theirs.get_submodule(name))
    # Closed loop (the default): each block rounds knowing what the rounded blocks before it give.
    compress_sequential(folder, recipe, corpus, tmp_path / "closed", dtype="float32", device="cpu", progress=False)
    closed = lmshrink.load(tmp_path / "closed")
    assert _ppl(closed, corpus) < 1.5 * _ppl(lmshrink.load_model(folder), corpus)


def test_a_table_with_rare_rows_at_fewer_bits_after_the_blocks(corpus, tmp_path):
    """gptq --rare-bits on the tied table block by block: after the blocks, on the calibration text's token counts and
    the final hidden states; the same rows and integers as the whole-model path (blocks left dense)."""
    from lmshrink.layers.quantized import MixedBitsEmbedding
    from lmshrink.recipes import apply_recipe, parse_recipe

    folder = _checkpoint(tmp_path / "tied", tie=True)
    recipe = parse_recipe({"stages": [
        {"targets": ["linears"], "method": "svd", "ratio": 1.0, "calibration_windows": WINDOWS, "window": WINDOW},
        {"targets": ["embedding", "lm_head"], "method": "gptq", "ratio": 1, "bits": 4, "rare_bits": 2, "rare_share": 0.5,
         "group_size": 16, "calibration_windows": WINDOWS, "window": WINDOW}]})
    compress_sequential(folder, recipe, corpus, tmp_path / "mixed", dtype="float32", device="cpu", progress=False)
    whole = lmshrink.load_model(folder)
    apply_recipe(whole, recipe, corpus, progress=False)
    ours, theirs = lmshrink.load(tmp_path / "mixed").model.model.embed_tokens, whole.model.model.embed_tokens
    assert isinstance(ours, MixedBitsEmbedding) and (ours.common_q.bits, ours.rare_q.bits) == (4, 2)
    assert torch.equal(ours.rare, theirs.rare) and 0 < int(ours.rare.sum()) < ours.num_embeddings
    assert float((ours.dense_weight() != theirs.dense_weight()).float().mean()) < 0.01


def whole_params(checkpoint) -> int:
    return sum(p.numel() for p in lmshrink.load_model(checkpoint).model.parameters())


def test_recipes_block_by_block_refuse_what_they_cannot_run(checkpoint, corpus, tmp_path):
    from lmshrink.recipes import parse_recipe

    two_calibrations = parse_recipe({"stages": [{"targets": ["attention"], "method": "svdllm", "ratio": 0.5},
                                                {"targets": ["mlp"], "method": "svdllm", "ratio": 0.5, "calibration_windows": 3}]})
    with pytest.raises(InvalidArgument, match=r"recipe stage 2 \(svdllm\): calibrates on 3 windows .* share one calibration"):
        compress_sequential(checkpoint, two_calibrations, corpus, tmp_path / "out", device="cpu", progress=False)
    two_mixes = parse_recipe({"stages": [{"targets": ["attention"], "method": "svdllm", "ratio": 0.5, "self_share": 0.25},
                                         {"targets": ["mlp"], "method": "svdllm", "ratio": 0.5}]})
    with pytest.raises(InvalidArgument, match=r"recipe stage 2 \(svdllm\): .*\(self_share None\), stage 1 .*\(self_share 0.25\)"):
        compress_sequential(checkpoint, two_mixes, corpus, tmp_path / "out", device="cpu", progress=False)
    only_outside = parse_recipe({"stages": [{"targets": ["embedding"], "method": "svd", "ratio": 0.5}]})
    with pytest.raises(InvalidArgument, match="--recipe: no stage compresses matrices inside the decoder blocks"):
        compress_sequential(checkpoint, only_outside, corpus, tmp_path / "out", device="cpu", progress=False)
    calibrated_outside = parse_recipe({"stages": [{"targets": ["linears"], "method": "svd", "ratio": 0.5},
                                                  {"targets": ["lm_head"], "method": "svdllm", "ratio": 0.5}]})
    with pytest.raises(InvalidArgument, match=r"recipe stage 2 \(svdllm\): compresses lm_head outside .* needs activation"):
        compress_sequential(checkpoint, calibrated_outside, corpus, tmp_path / "out", device="cpu", progress=False)
    other_windows = parse_recipe({"stages": [{"targets": ["linears"], "method": "svdllm", "ratio": 0.5},
                                             {"targets": ["lm_head"], "method": "gptq", "ratio": 1, "calibration_windows": 3}]})
    with pytest.raises(InvalidArgument, match=r"recipe stage 2 \(gptq\): calibrates on 3 windows .* after them share one"):
        compress_sequential(checkpoint, other_windows, corpus, tmp_path / "out", device="cpu", progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_recipe_block_by_block(checkpoint, corpus, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("stages:\n  - {targets: [embedding], method: svd, ratio: 0.5}\n"
                      "  - {targets: [linears], method: svdllm, ratio: 0.5, bits: 8, calibration_windows: 2, window: 32}\n")
    text = tmp_path / "text.txt"
    text.write_text(corpus.train[:60_000])
    done = _cli("compress", checkpoint, "--recipe", recipe, "--sequential", "--refit", "--dtype", "float32", "--data", text,
                "--window", 32, "--tokens", 128, "--out", tmp_path / "out", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["method"] == "recipe-recipe" and result["plan"]["refit"] is True  # the file's stem names it and result["plan"]["stage"] == 2
    assert [m["stage"] for m in result["modules"]] == [1] + [2] * 14
    assert {m["layer"] for m in result["modules"][1:]} == {"QuantizedLowRankLinear"}
    assert [s["method"] for s in result["recipe"]["applied"]] == ["svd", "svdllm"]
    assert 1 < result["perplexity"]["after"] < 1e4
