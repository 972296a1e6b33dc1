"""Distributed block-by-block compression: torchrun with 2 CPU processes (gloo) against one process.

Each torchrun launch costs seconds of start-up, so every launch checks several things: two processes, one thread
each, a tiny random LLaMA.
"""

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
from conftest import tiny_llama
from lmshrink.distributed import SINGLE, World, matrix_cost, pack_by_cost
from lmshrink.sequential import compress_sequential

SRC = str(Path(lmshrink.__file__).parents[1])
COMMON = ["--sequential", "--device", "cpu", "--dtype", "float32", "--data", "pydoc", "--ratio", "0.5", "--window", "48"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    loaded = tiny_llama(seed=1)
    loaded.model.save_pretrained(folder, max_shard_size="60KB")
    loaded.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def one_thread():
    # The same thread count as each worker: LAPACK's and the GEMMs' results then agree bit for bit.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _torchrun(args, cwd, script: str | None = None, nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1",
           "LMSHRINK_NO_STATS_CACHE": "1", "LMSHRINK_DIST_TIMEOUT": "120", "TOKENIZERS_PARALLELISM": "false",
           "TMPDIR": str(cwd)}  # a rank killed by a test cannot remove its scratch folder: keep it in the test's folder
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    if script is not None:
        path = Path(cwd) / "worker.py"
        path.write_text(textwrap.dedent(script))
        command = [*launcher, str(path), *map(str, args)]
    else:
        command = [*launcher, "-m", "lmshrink", "--threads", "1", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(folder.glob("model-*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_shards_cover_every_window_once_and_packing_balances_cost():
    for count in (0, 1, 5, 8):
        for size in (1, 2, 3, 8):
            parts = [list(range(count))[World(rank=r, size=size).shard(count)] for r in range(size)]
            assert sum(parts, []) == list(range(count))  # contiguous, in order, each window once
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert SINGLE.shard(7) == slice(0, 7)
    # A LLaMA block (d=64, ffn=128, 2 kv heads): q k v o gate up down. The down projection (n = ffn) costs most
    # (measured: about twice the up projection, benchmarks/matrix_cost.md), then gate and up, which an SVD's
    # m·n·min(m, n) alone would rank equal to it.
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]
    costs = [matrix_cost(s) for s in shapes]
    assert costs[6] > costs[4] == costs[5] > costs[0] == costs[3] > costs[1] == costs[2]
    assert costs[6] == 64 * 128 * 64 + 128 ** 3 // 8 and costs[4] == 128 * 64 * 64 + 64 ** 3 // 8
    owners = pack_by_cost(costs, 2)
    loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(2)]
    # Largest first, each to the least loaded rank: down -> 0, gate -> 1, up -> 1, q -> 0, o -> 0, k -> 1, v -> 1.
    assert owners == [0, 1, 1, 0, 1, 1, 0] and max(loads) / min(loads) < 1.06
    assert pack_by_cost(costs, 9).count(7) == 0 and sorted(pack_by_cost(costs, 9)) == list(range(7))  # 2 ranks idle
    assert pack_by_cost(costs, 1) == [0] * 7


def test_two_processes_svd_equal_one_process_exactly(checkpoint, tmp_path, one_thread):
    """svd: every factor bit for bit; the manifest says 2 processes; only rank 0 prints; perplexity over one
    evaluation window (rank 1 scores none) equals the single process's."""
    done = _torchrun(["compress", checkpoint, "--method", "svd", *COMMON, "--tokens", "48", "--json", "--out", tmp_path / "two"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)  # one JSON object: nothing else on stdout, from either process
    assert result["processes"] == 2 and result["plan"]["processes"] == 2
    assert not _error_lines(done.stderr)
    one = compress_sequential(checkpoint, lmshrink.Plan(method="svd", ratio=0.5, window=48), None, tmp_path / "one",
                              dtype="float32", device="cpu", progress=False)
    ours, theirs = _weights(tmp_path / "two"), _weights(tmp_path / "one")
    assert set(ours) == set(theirs) and any(k.endswith(".left") for k in ours)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    manifest = json.loads((tmp_path / "two" / "lmshrink.json").read_text())
    assert manifest["run"] == {"processes": 2, "executor": "sequential"}
    assert manifest["compression"] == json.loads((tmp_path / "one" / "lmshrink.json").read_text())["compression"]
    assert [m["rank"] for m in result["modules"]] == [m["rank"] for m in one.modules]
    from lmshrink.evaluate import corpus_perplexity

    single = corpus_perplexity(lmshrink.load(tmp_path / "one"), lmshrink.load_corpus("pydoc"), tokens=48, window=48, progress=False)
    assert result["perplexity"]["after"] == pytest.approx(single["perplexity"], rel=1e-12)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir() if p.name != ".pytest_cache")


@pytest.mark.parametrize("method", ["fwhiten", "kfac"])
def test_two_processes_fwhiten_match_one_process(checkpoint, tmp_path, one_thread, method):
    """fwhiten (exact Fisher + input Gram) and kfac (exact output-gradient Gram + input Gram), closed loop, 3 windows over 2 processes (2 + 1), and targets that leave
    block 1 one matrix (rank 1 idle there). The statistics are sums over windows added across processes, so they
    differ from one process's only in summation order (float32 Fisher: ~1e-7 relative); the factors then agree to
    1e-4 relative (the SVD amplifies that by the conditioning of the whitened matrix)."""
    targets = ["--targets", "model.layers.0.*", "--targets", "*.q_proj"]
    done = _torchrun(["compress", checkpoint, "--method", method, *COMMON, *targets, "--calibration-windows", "3",
                      "--tokens", "192", "--json", "--out", tmp_path / "two"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    plan = lmshrink.Plan(method=method, ratio=0.5, window=48, calibration_windows=3, targets=("model.layers.0.*", "*.q_proj"))
    one = compress_sequential(checkpoint, plan, "pydoc", tmp_path / "one", dtype="float32", device="cpu", progress=False)
    ours, theirs = _weights(tmp_path / "two"), _weights(tmp_path / "one")
    assert set(ours) == set(theirs) and sum(k.endswith(".left") for k in ours) == 8
    for name in ours:
        scale = float(theirs[name].abs().max())
        assert torch.allclose(ours[name], theirs[name], rtol=1e-4, atol=1e-4 * scale), name
    assert [m["rank"] for m in result["modules"]] == [m["rank"] for m in one.modules]
    from lmshrink.evaluate import corpus_perplexity

    single = corpus_perplexity(lmshrink.load(tmp_path / "one"), lmshrink.load_corpus("pydoc"), tokens=192, window=48, progress=False)
    assert result["perplexity"]["after"] == pytest.approx(single["perplexity"], rel=1e-4)


def test_two_processes_refit_match_one_process(checkpoint, tmp_path, one_thread):
    """--refit's sums (x_o x_c^T, x_c x_c^T) are added across processes like the other statistics: the refitted
    factors agree with one process's to float32 summation order."""
    done = _torchrun(["compress", checkpoint, "--method", "svdllm", *COMMON, "--refit", "--calibration-windows", "3",
                      "--tokens", "96", "--json", "--out", tmp_path / "two"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["plan"]["refit"] is True
    plan = lmshrink.Plan(method="svdllm", ratio=0.5, window=48, calibration_windows=3)
    compress_sequential(checkpoint, plan, "pydoc", tmp_path / "one", dtype="float32", device="cpu", progress=False, refit=True)
    plain = compress_sequential(checkpoint, plan, "pydoc", tmp_path / "plain", dtype="float32", device="cpu", progress=False)
    ours, theirs, before = _weights(tmp_path / "two"), _weights(tmp_path / "one"), _weights(tmp_path / "plain")
    assert set(ours) == set(theirs)
    for name in ours:
        scale = float(theirs[name].abs().max())
        assert torch.allclose(ours[name], theirs[name], rtol=1e-4, atol=1e-4 * scale), name
    assert not all(torch.allclose(theirs[k], before[k]) for k in theirs if k.endswith(".left"))  # the refit did move them


def test_two_processes_joint_match_one_process(checkpoint, tmp_path, one_thread):
    """--joint: a stacked group (q/k/v; gate/up) is one matrix for the cost packing; its factors, the shared right one
    with them, come from the rank that owns it, and the refit of the members' left factors uses the added sums."""
    done = _torchrun(["compress", checkpoint, "--method", "fwhiten", *COMMON, "--joint", "--refit", "--calibration-windows", "3",
                      "--tokens", "96", "--json", "--out", tmp_path / "two"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["plan"]["joint"] is True
    plan = lmshrink.Plan(method="fwhiten", ratio=0.5, window=48, calibration_windows=3, joint=True)
    compress_sequential(checkpoint, plan, "pydoc", tmp_path / "one", dtype="float32", device="cpu", progress=False, refit=True)
    ours, theirs = _weights(tmp_path / "two"), _weights(tmp_path / "one")
    assert set(ours) == set(theirs)
    modules = json.loads((tmp_path / "two" / "lmshrink.json").read_text())["modules"]
    assert modules == json.loads((tmp_path / "one" / "lmshrink.json").read_text())["modules"]  # ranks and shares alike
    assert sum("shared" in entry for entry in modules.values()) == 6  # k, v and up of each of the 2 blocks
    for name in ours:
        scale = float(theirs[name].abs().max())
        assert torch.allclose(ours[name], theirs[name], rtol=1e-4, atol=1e-4 * scale), name
    again = lmshrink.load(tmp_path / "two")
    layer = again.model.model.layers[0]
    assert layer.self_attn.k_proj.right is layer.self_attn.q_proj.right  # the share survives the distributed save


def test_two_processes_run_the_channels_recipe_like_one(checkpoint, tmp_path, one_thread):
    """Two stages inside the blocks (nystrom on the MLPs, fwhiten on attention): one calibration pass per block, the
    statistics added across processes; nystrom's channels are chosen on every process from the same sums."""
    recipe = tmp_path / "channels.yaml"
    recipe.write_text("stages:\n"
                      "  - {targets: [mlp], method: nystrom, ratio: 0.75, calibration_windows: 3, window: 48}\n"
                      "  - {targets: [attention], method: fwhiten, ratio: 0.5, calibration_windows: 3, window: 48}\n")
    args = ["--sequential", "--device", "cpu", "--dtype", "float32", "--data", "pydoc", "--window", "48"]
    done = _torchrun(["compress", checkpoint, "--recipe", recipe, *args, "--tokens", "96", "--json", "--out", tmp_path / "two"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [m["stage"] for m in json.loads(done.stdout)["modules"]] == [1] * 6 + [2] * 8
    from lmshrink.recipes import load_recipe

    compress_sequential(checkpoint, load_recipe(recipe), "pydoc", tmp_path / "one", dtype="float32", device="cpu", progress=False)
    ours, theirs = _weights(tmp_path / "two"), _weights(tmp_path / "one")
    assert set(ours) == set(theirs) and sum(k.endswith(".kept") for k in ours) == 6
    for name in ours:
        if name.endswith(".kept"):
            assert torch.equal(ours[name], theirs[name]), name
        else:
            scale = float(theirs[name].abs().max())
            assert torch.allclose(ours[name], theirs[name], rtol=1e-4, atol=1e-4 * scale), name


KILLER = """
    import os, signal, sys
    import lmshrink.sequential
    from lmshrink.cli import main

    load_block = lmshrink.sequential.Engine.load_block
    def dying(self, index):
        if os.environ["RANK"] == "1" and index == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would
        return load_block(self, index)
    lmshrink.sequential.Engine.load_block = dying
    main(sys.argv[1:])
"""


def test_a_killed_worker_ends_the_run_with_a_clear_error_and_no_output(checkpoint, tmp_path):
    out = tmp_path / "out"
    done = _torchrun(["--threads", "1", "compress", checkpoint, "--method", "svd", *COMMON, "--tokens", "48", "--out", out],
                     tmp_path, script=KILLER)
    assert done.returncode != 0
    errors = _error_lines(done.stderr)
    assert errors, done.stderr[-3000:]
    # Rank 0 either sees the broken connection in a collective or is stopped by torchrun: both say so in one line.
    assert any("lost a process" in e or "torchrun: the run was stopped" in e for e in errors), errors
    assert not out.exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.") and p.name.endswith(".partial")]


API = """
    import json, sys
    import torch.distributed as dist
    import lmshrink
    import lmshrink.sequential
    from lmshrink.errors import DistributedError
    from lmshrink.sequential import compress_sequential

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    checkpoint, out = sys.argv[1], sys.argv[2]
    seen = {}
    for case in ("version", "options", "ok"):
        plan = lmshrink.Plan(method="svd", ratio=0.6 if case == "options" and rank == 1 else 0.5)
        lmshrink.sequential.__version__ = "0.0.0-other" if case == "version" and rank == 1 else "0.1.0"  # what the fingerprint reads
        try:
            report = compress_sequential(checkpoint, plan, None, out, dtype="float32", device="cpu", progress=False)
            seen[case] = {"processes": report.plan["processes"], "factorized": len(report.compressed)}
        except DistributedError as error:
            seen[case] = {"error": str(error)}
    with open(f"{out}.rank{rank}.json", "w") as file:
        json.dump(seen, file)
    dist.destroy_process_group()
"""


def test_python_api_in_a_process_group_refuses_mismatched_versions_and_options(checkpoint, tmp_path):
    out = tmp_path / "out"
    done = _torchrun([checkpoint, out], tmp_path, script=API)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = [json.loads((tmp_path / f"out.rank{rank}.json").read_text()) for rank in range(2)]
    for rank in range(2):  # every process refuses, with the same message, before any work
        assert "lmshrink: '0.1.0' on rank 0, '0.0.0-other' on rank 1" in seen[rank]["version"]["error"]
        assert "plan: " in seen[rank]["options"]["error"] and "disagree" in seen[rank]["options"]["error"]
        assert seen[rank]["ok"] == {"processes": 2, "factorized": 14}
    assert seen[0]["version"] == seen[1]["version"]
    assert json.loads((out / "lmshrink.json").read_text())["run"]["processes"] == 2


def test_cuda_with_fewer_gpus_than_processes_is_refused_on_rank_0(checkpoint, tmp_path):
    if torch.cuda.is_available() and torch.cuda.device_count() >= 2:
        pytest.skip("this machine has 2 GPUs: 2 processes fit")
    done = _torchrun(["compress", checkpoint, "--method", "svd", "--sequential", "--device", "cuda", "--tokens", "48", "--window", "48",
                      "--out", tmp_path / "out"], tmp_path)
    assert done.returncode != 0 and "rank      : 0 (local_rank: 0)\n  exitcode  : 2 " in done.stderr, done.stderr[-3000:]
    errors = _error_lines(done.stderr)
    assert len(errors) == 1, done.stderr[-3000:]  # rank 0 only (torchrun's own report follows)
    if torch.cuda.is_available():  # one GPU for two processes
        assert errors[0].startswith("error: --device: cuda with 2 processes on this node but") and "--device cpu" in errors[0]
    else:  # no GPU at all: the device check before the processes meet says so, on rank 0 only
        assert errors[0].startswith("error: --device: 'cuda' was asked but this machine has no CUDA device"), errors[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torchrun_on_one_gpu_joins_nccl_and_matches_one_process(checkpoint, tmp_path):
    """One process per GPU under torchrun (the nccl + gloo group is set up and torn down) writes what a plain
    process on the same GPU writes."""
    args = ["--method", "fwhiten", "--sequential", "--device", "cuda", "--dtype", "float32", "--data", "pydoc", "--ratio", "0.5",
            "--window", "48", "--tokens", "48"]
    done = _torchrun(["compress", checkpoint, *args, "--out", tmp_path / "run"], tmp_path, nproc=1)
    assert done.returncode == 0, done.stderr[-3000:]
    alone = subprocess.run([sys.executable, "-m", "lmshrink", "--threads", "1", "compress", checkpoint, *args, "--out", tmp_path / "alone"],
                           capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "LMSHRINK_NO_STATS_CACHE": "1",
                           "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}, timeout=600)
    assert alone.returncode == 0, alone.stderr[-3000:]
    ours, theirs = _weights(tmp_path / "run"), _weights(tmp_path / "alone")
    assert set(ours) == set(theirs) and any(k.endswith(".left") for k in ours)
    assert all(torch.allclose(ours[k], theirs[k], rtol=1e-4, atol=1e-6) for k in ours)


def test_a_rendezvous_that_times_out_is_one_clear_error(checkpoint, tmp_path):
    """Rank 0 of 2 started alone (as when a node never comes up): the rendezvous gives up after LMSHRINK_DIST_TIMEOUT."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]), "RANK": "0", "WORLD_SIZE": "2",
           "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "LMSHRINK_DIST_TIMEOUT": "2"}
    done = subprocess.run([sys.executable, "-m", "lmshrink", "compress", checkpoint, "--method", "svd", *COMMON, "--tokens", "48",
                           "--out", tmp_path / "out"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 2
    assert _error_lines(done.stderr) == [done.stderr.strip().splitlines()[-1]]
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"error: rendezvous: the 2 processes of the run did not all join at 127.0.0.1:{port} within 2 s (this is rank 0)")
    assert not (tmp_path / "out").exists()


def test_two_processes_compress_the_whole_model_like_one(checkpoint, tmp_path, one_thread):
    """The whole-model executor under torchrun: 3 calibration windows split 2 + 1 and added, fwhiten's sensitivity
    spectra and factorizations packed by cost across the two processes, evaluation windows split. The result
    matches one process's to float32 summation order (as block by block); rank 0 alone samples, times and saves."""
    args = ["--method", "fwhiten", "--allocation", "sensitivity", "--device", "cpu", "--dtype", "float32", "--data", "pydoc",
            "--ratio", "0.5", "--window", "48", "--calibration-windows", "3", "--tokens", "192"]
    done = _torchrun(["compress", checkpoint, *args, "--json", "--out", tmp_path / "two"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)  # one JSON object: rank 1 prints nothing
    assert result["processes"] == 2 and not _error_lines(done.stderr)
    assert result["samples"]["before"] and result["tokens_per_s"]["after"] > 0  # measured on rank 0
    plan = lmshrink.Plan(method="fwhiten", allocation="sensitivity", ratio=0.5, window=48, calibration_windows=3)
    os.environ["LMSHRINK_NO_STATS_CACHE"] = "1"
    try:
        one = lmshrink.run_compress(str(checkpoint), plan, "pydoc", device="cpu", dtype="float32", out=tmp_path / "one",
                                    evaluate=lmshrink.pipeline.EvalOptions(tokens=192, window=48, samples=False, speed=False))
    finally:
        del os.environ["LMSHRINK_NO_STATS_CACHE"]
    assert [m["rank"] for m in result["modules"]] == [m["rank"] for m in one.modules]
    assert len({m["rank"] for m in one.modules if m["rank"]}) > 2  # sensitivity moved ranks: the spectra were used
    ours, theirs = _weights(tmp_path / "two"), _weights(tmp_path / "one")
    assert set(ours) == set(theirs) and sum(k.endswith(".left") for k in ours) == 14
    for name in ours:
        scale = float(theirs[name].abs().max())
        assert torch.allclose(ours[name], theirs[name], rtol=1e-4, atol=1e-4 * scale), name
    for key in ("before", "after"):
        assert result["perplexity"][key] == pytest.approx(one.to_dict()["perplexity"][key], rel=1e-4)
    assert json.loads((tmp_path / "two" / "lmshrink.json").read_text())["run"] == {"processes": 2, "executor": "whole-model"}


def test_whole_model_options_one_process_runs_are_refused_on_rank_0(checkpoint, tmp_path):
    done = _torchrun(["compress", checkpoint, "--method", "svd", "--device", "cpu", "--ratio", "0.5", "--window", "48",
                      "--tokens", "48", "--finetune-steps", "2", "--out", tmp_path / "out"], tmp_path)
    assert done.returncode != 0 and "rank      : 0 (local_rank: 0)\n  exitcode  : 2 " in done.stderr, done.stderr[-3000:]
    assert _error_lines(done.stderr) == ["error: --finetune-steps: is not available when 2 processes compress the whole model; "
                                         "allowed: one process for it, or --sequential (block by block) for --calibrate-on and --refit"]
    assert not (tmp_path / "out").exists()


WHOLE_API = """
    import json, sys
    import torch
    import torch.distributed as dist
    import lmshrink
    from lmshrink.errors import DistributedError

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    checkpoint, out = sys.argv[1], sys.argv[2]
    seen = {}
    for case in ("options", "ok"):
        plan = lmshrink.Plan(method="fwhiten", ratio=0.6 if case == "options" and rank == 1 else 0.5, window=48, calibration_windows=3)
        loaded = lmshrink.load_model(checkpoint, dtype="float32")
        try:
            report = lmshrink.compress(loaded, plan, "pydoc", progress=False)
            weights = {k: v.double() for k, v in loaded.model.state_dict().items()}
            seen[case] = {"ranks": [m["rank"] for m in report.modules], "sum": float(sum(w.sum() for w in weights.values())),
                          "sq": float(sum((w * w).sum() for w in weights.values()))}
        except DistributedError as error:
            seen[case] = {"error": str(error)}
    with open(f"{out}.rank{rank}.json", "w") as file:
        json.dump(seen, file)
    dist.destroy_process_group()
"""


def test_python_compress_in_a_process_group_splits_the_work_and_agrees(checkpoint, tmp_path, one_thread):
    """lmshrink.compress called by every process of a process group: a plan that differs is refused by both; the
    same plan leaves both processes with the same model (statistics all-reduced, factors broadcast), equal to one
    process's up to summation order."""
    done = _torchrun([checkpoint, tmp_path / "out"], tmp_path, script=WHOLE_API)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = [json.loads((tmp_path / f"out.rank{rank}.json").read_text()) for rank in range(2)]
    assert seen[0]["options"] == seen[1]["options"] and "disagree" in seen[0]["options"]["error"]
    assert seen[0]["ok"] == seen[1]["ok"]  # bit for bit the same model on both processes
    os.environ["LMSHRINK_NO_STATS_CACHE"] = "1"
    try:
        loaded = lmshrink.load_model(str(checkpoint), dtype="float32")
        report = lmshrink.compress(loaded, lmshrink.Plan(method="fwhiten", ratio=0.5, window=48, calibration_windows=3), "pydoc",
                                   progress=False)
    finally:
        del os.environ["LMSHRINK_NO_STATS_CACHE"]
    weights = [v.double() for v in loaded.model.state_dict().values()]
    assert seen[0]["ok"]["ranks"] == [m["rank"] for m in report.modules]
    assert seen[0]["ok"]["sq"] == pytest.approx(float(sum((w * w).sum() for w in weights)), rel=1e-5)
