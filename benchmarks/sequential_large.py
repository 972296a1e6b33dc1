"""Block-by-block compression of a model larger than the memory it is given (issue 13, benchmark b).

    python benchmarks/sequential_large.py [--layers 28 --hidden 2048 --intermediate 5632] [--method svdllm --ratio 0.8]

Writes a random-weight LLaMA-architecture model (about 1.6B parameters with the defaults) as sharded bf16
safetensors into a scratch folder (never kept), then compresses it block by block in a child process whose data
segment may grow by at most ``--limit-fraction`` of the bf16 weights (RLIMIT_DATA, enforced by the kernel), and
records the child's peak RSS (ru_maxrss) and the wall time of each block. The whole-model path is then tried under
the same limit (it must fail: it loads the whole model in float32). Random weights: the perplexity is meaningless,
only time and memory are measured. A byte-level tokenizer (256 tokens) reads the calibration text.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

_CHILD = r"""
import json, resource, sys, time
import torch
import lmshrink
import transformers.models.llama.modeling_llama  # imported before the limit is measured, as everything below is
from lmshrink import sequential

spec = json.loads(sys.argv[1])
if spec["threads"]:
    torch.set_num_threads(spec["threads"])
def status(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field + ":")).split()[1]) * 1024
def vm_data():
    return status("VmData")
def peak():  # VmHWM: this process's own peak RSS (ru_maxrss would carry the parent's peak across fork + exec)
    return status("VmHWM") / 2**20
if spec["device"] != "cpu" and torch.cuda.is_available():  # the CUDA context's own mappings are not the model's memory
    torch.zeros(1, device="cuda")
limit = vm_data() + spec["headroom"]
resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
plan = lmshrink.Plan(method=spec["method"], ratio=spec["ratio"], calibration_windows=spec["windows"], window=spec["window"],
                     allocation=spec["allocation"])
block_starts = []
load_block = sequential.Engine.load_block
def timed_load_block(self, index):  # the benchmark's own probe: when each block starts
    block_starts.append(time.perf_counter())
    return load_block(self, index)
sequential.Engine.load_block = timed_load_block
start = time.perf_counter()
try:
    if spec["path"] == "sequential":
        report = sequential.compress_sequential(spec["model"], plan, spec["data"], spec["out"], dtype="bfloat16", device=spec["device"],
                                                progress=False)
    else:
        loaded = lmshrink.load_model(spec["model"])
        report = lmshrink.compress(loaded, plan, data=spec["data"], progress=False)
except Exception as error:  # any failure is a result here: what failed, after how long, at what peak
    print("RESULT " + json.dumps({"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}",
                                  "seconds": time.perf_counter() - start, "peak_rss_mib": peak()}))
    sys.exit(0)
end = time.perf_counter()
blocks = [b - a for a, b in zip(block_starts, block_starts[1:] + [end])]
gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
gpu_name = torch.cuda.get_device_name() if torch.cuda.is_available() else None
print("RESULT " + json.dumps({"seconds": end - start, "before_first_block_seconds": block_starts[0] - start if block_starts else None,
                              "block_seconds": blocks, "peak_rss_mib": peak(), "gpu_peak_mib": gpu_peak, "gpu_name": gpu_name,
                              "limit_bytes": limit, "params_before": report.params_before, "params_after": report.params_after}))
"""

# Tokens/s of the original and the compressed model on the device, alternated (evaluate.compare_throughput), in a child
# of its own without a memory limit: one token (a decode step's weight reads, without a KV cache), one and 16 windows.
_SPEED = r"""
import json, sys
import torch
import lmshrink
from lmshrink.evaluate import compare_throughput

spec = json.loads(sys.argv[1])
original = lmshrink.load_model(spec["model"], device=spec["device"], dtype="bfloat16")
compressed = lmshrink.load(spec["out"], device=spec["device"])
result = {}
for batch, tokens in ((1, 1), (1, 512), (16, 512)):
    speed = compare_throughput(original, compressed, tokens=tokens, batch_size=batch, rounds=15)
    result[f"{batch}x{tokens}"] = {"before": speed["before"]["tokens_per_s"], "after": speed["after"]["tokens_per_s"],
                                   "speedup": speed["speedup"], "spread": speed["speedup_spread"], "noisy": speed["noisy"]}
result["device_name"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
print("RESULT " + json.dumps(result))
"""


def write_model(folder: Path, layers: int, hidden: int, intermediate: int, vocab: int) -> tuple[int, int]:
    """Random bf16 LLaMA weights written shard by shard as they are made; returns (parameters, bf16 bytes)."""
    import torch
    from transformers import LlamaConfig

    from lmshrink.models.blocks import build_skeleton
    from lmshrink.shards import ShardWriter

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.conftest import byte_tokenizer

    heads = max(1, hidden // 128)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, vocab_size=vocab, max_position_embeddings=4096, dtype="bfloat16",
                         tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    writer = ShardWriter(folder, torch.bfloat16, max_shard_bytes=2 << 30)
    generator = torch.Generator().manual_seed(0)
    count = 0
    for name, tensor in build_skeleton(config, torch.bfloat16).state_dict().items():
        count += tensor.numel()
        scale = 1 / tensor.shape[-1] ** 0.5
        writer.add({name: (torch.ones(tensor.shape, dtype=torch.bfloat16) if "norm" in name else
                           (torch.randn(tensor.shape, generator=generator) * scale).to(torch.bfloat16))})
    writer.close()
    config.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return count, count * 2


def main() -> None:
    from _common import run_child, write_results

    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--method", default="svdllm")
    parser.add_argument("--ratio", type=float, default=0.8)
    parser.add_argument("--allocation", default="uniform", choices=["uniform", "sensitivity"])
    parser.add_argument("--speed", action="store_true", help="Also time the original and the compressed model on --device.")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--data", default="pydoc")
    parser.add_argument("--limit-fraction", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="Where the blocks run (cpu, cuda, auto).")
    parser.add_argument("--name", default="sequential_large")
    parser.add_argument("--write", nargs=5, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write:  # the model is written by a child: the measured runs must not inherit its memory
        folder, *sizes = args.write
        print(json.dumps(write_model(Path(folder), *map(int, sizes))))
        return
    with tempfile.TemporaryDirectory(prefix="lmshrink-large-") as scratch:
        model = Path(scratch) / "model"
        started = time.perf_counter()
        made = subprocess.run([sys.executable, __file__, "--write", str(model), *map(str, (args.layers, args.hidden, args.intermediate,
                                                                                          args.vocab))], capture_output=True, text=True, check=True)
        params, weight_bytes = json.loads(made.stdout.strip().splitlines()[-1])
        written = time.perf_counter() - started
        headroom = int(weight_bytes * args.limit_fraction)
        # glibc's adaptive mmap threshold keeps freed blocks in the heap; a fixed one returns big buffers to the OS.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        runs, speed = {}, None
        for path in ("sequential", "whole"):
            spec = {"model": str(model), "path": path, "method": args.method, "ratio": args.ratio, "windows": args.windows,
                    "window": args.window, "data": args.data, "threads": args.threads, "headroom": headroom, "device": args.device,
                    "allocation": args.allocation,
                    "out": str(Path(scratch) / f"out-{path}")}
            runs[path] = run_child([sys.executable, "-c", _CHILD, json.dumps(spec)], env)
            print(path, runs[path], flush=True)
            if path == "sequential" and args.speed and "error" not in runs[path]:
                speed = run_child([sys.executable, "-c", _SPEED, json.dumps(spec)])
                print("speed", speed, flush=True)
    sequential = runs["sequential"]
    blocks = sorted(sequential.get("block_seconds") or [])
    rows = [[path, f"{weight_bytes / 2**20:.0f}", f"{headroom / 2**20:.0f}", run.get("peak_rss_mib"), run.get("gpu_peak_mib"),
             run.get("seconds"), blocks[len(blocks) // 2] if path == "sequential" and blocks else None, run.get("error")]
            for path, run in runs.items()]
    gpu = runs["sequential"].get("gpu_name")
    machine = f"{os.cpu_count()} CPU cores" + (f", {gpu}" if gpu else "")
    speed_notes = [f"Forward tokens/s on {args.device}, original (bf16) vs compressed, 15 alternated rounds, medians: " +
                   "; ".join(f"{shape}: {v['before']:,.0f} -> {v['after']:,.0f} (x{v['speedup']:.2f} +- {100 * v['spread']:.0f}%)"
                             for shape, v in speed.items() if isinstance(v, dict))] if speed and "error" not in speed else []
    write_results(args.name, {"parameters": params, "weights_bf16_bytes": weight_bytes, "limit_headroom_bytes": headroom,
                              "write_seconds": written, "args": vars(args), "runs": runs, "speed": speed, "machine": machine},
                  ["path", "bf16 weights MiB", "allowed growth MiB (RLIMIT_DATA)", "peak RSS MiB", "peak GPU MiB", "wall s",
                   "median s per block", "error"],
                  rows,
                  notes=[f"Random LLaMA: {params / 1e9:.2f}B parameters, {args.layers} blocks, hidden {args.hidden}, MLP {args.intermediate}, "
                         f"vocab {args.vocab}, untied; sharded bf16 safetensors written by the benchmark ({written:.0f} s).",
                         f"{args.method} ({args.allocation} allocation) at ratio {args.ratio} on all attention/MLP linears, block by "
                         f"block in bfloat16 on {args.device}, "
                         f"closed loop, {args.windows} calibration windows of {args.window} tokens ({args.data} text, byte tokenizer).",
                         "The child's data segment may grow by the allowed amount above what it holds after importing torch and "
                         "transformers (RLIMIT_DATA; file-backed mappings such as the safetensors shards being read are not counted); "
                         "peak RSS is the child's VmHWM, which includes the imported libraries' code and the pages of mapped shards.",
                         "Per-block time: from one block's load to the next (read, calibrate, factorize, propagate, write); "
                         f"{len(sequential.get('block_seconds') or [])} block loads for {args.layers} blocks (sensitivity allocation "
                         "reads each block once per pass).",
                         *speed_notes,
                         f"Machine: {machine}; shared machines: wall times are noisy."])


if __name__ == "__main__":
    main()
