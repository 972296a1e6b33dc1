"""Distributed block-by-block compression (issue 14): 1 process x 2 threads against 2 processes x 1 thread (torchrun,
gloo) on this machine, then a scaling model for 7B and 70B on 1, 8 and 64 GPUs built from the measured costs.

    python benchmarks/distributed.py [--model smollm2-135m] [--ratio 0.8] [--windows 8] [--tokens 4096] [--name NAME]

Each configuration is a child process (torchrun for 2 processes) running compress_sequential (fwhiten, closed loop,
float32 on the CPU) and the perplexity of its output, with the phases timed by wrapping lmshrink.sequential's own
steps: the exact-Fisher pass (``exact_fisher``), the factorization (``factorize_targets``, including sharing the
factors) and the rest of the compression (input statistics, closed-loop forward, reading and writing blocks).
Every factorization call is timed with its matrix shape, which gives the per-matrix cost fit of the model.
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
SCRIPT = Path(__file__).resolve()


def child(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    import lmshrink
    import lmshrink.sequential as seq
    from lmshrink.distributed import all_gather_json, init_world
    from lmshrink.evaluate import corpus_perplexity

    world = init_world("cpu")
    phases = {"fisher_s": 0.0, "factorize_s": 0.0}
    matrices = []
    fisher, factorize_targets = seq.exact_fisher, seq.factorize_targets

    def timed_fisher(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fisher(*args, **kwargs)
        finally:
            phases["fisher_s"] += time.perf_counter() - start

    class Timed:  # the method, with every factorization timed (only the owner of a matrix calls it)
        def __init__(self, method):
            self.method, self.name, self.needs, self.kind = method, method.name, method.needs, method.kind

        def function(self, weight, rank, stats, options):
            start = time.perf_counter()
            factors = self.method.function(weight, rank, stats, options)
            matrices.append({"shape": list(weight.shape), "rank": rank, "seconds": time.perf_counter() - start})
            return factors

    def timed_targets(loaded, targets, ranks, method, *rest):
        start = time.perf_counter()
        try:
            return factorize_targets(loaded, targets, ranks, Timed(method), *rest)
        finally:
            phases["factorize_s"] += time.perf_counter() - start

    seq.exact_fisher, seq.factorize_targets = timed_fisher, timed_targets
    corpus = lmshrink.load_corpus(spec["data"])
    plan = lmshrink.Plan(method="fwhiten", ratio=spec["ratio"], calibration_windows=spec["windows"], window=spec["window"],
                         targets=tuple(spec["targets"]))
    start = time.perf_counter()
    report = seq.compress_sequential(spec["model"], plan, corpus, spec["out"], dtype="float32", device="cpu", progress=False,
                                     world=world)
    phases["compress_s"] = time.perf_counter() - start
    start = time.perf_counter()
    loaded = lmshrink.load(spec["out"])
    ppl = corpus_perplexity(loaded, corpus, tokens=spec["tokens"], window=spec["window"], progress=False, world=world)
    phases["evaluate_s"] = time.perf_counter() - start
    everyone = all_gather_json(world, {"phases": phases, "matrices": matrices})
    if world.main:
        print("RESULT " + json.dumps({"processes": world.size, "threads": spec["threads"], "perplexity": ppl["perplexity"],
                                      "eval_tokens": ppl["tokens"], "params_after": report.params_after,
                                      "per_rank": everyone}), flush=True)


def run(spec: dict, processes: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "LMSHRINK_NO_STATS_CACHE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(SCRIPT.parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    launcher = [sys.executable] if processes == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                        "--nproc_per_node", str(processes)]
    start = time.perf_counter()
    done = subprocess.run([*launcher, str(SCRIPT), "--child", json.dumps(spec)], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"run failed ({processes} processes):\n{done.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    result["wall_s"] = wall
    main = result["per_rank"][0]["phases"]
    result["phases"] = {"calibration_s": main["compress_s"] - main["factorize_s"], "fisher_s": main["fisher_s"],
                        "factorize_s": main["factorize_s"], "evaluate_s": main["evaluate_s"], "compress_s": main["compress_s"]}
    return result


# The scaling model ------------------------------------------------------------------------------------------------

def llama_shapes(d: int, ffn: int, kv: int) -> list[tuple[int, int]]:
    """The 7 linears of one LLaMA block, (out, in): q, k, v, o, gate, up, down."""
    return [(d, d), (kv, d), (kv, d), (d, d), (ffn, d), (ffn, d), (d, ffn)]


MODELS = {"7B (LLaMA-2 7B: d 4096, ffn 11008, 32 blocks)": (llama_shapes(4096, 11008, 4096), 32),
          "70B (LLaMA-2 70B: d 8192, ffn 28672, GQA kv 1024, 80 blocks)": (llama_shapes(8192, 28672, 1024), 80)}
# Assumptions about the GPUs (not measured here; no GPU on this machine), stated in the report:
GPU_MATMUL_FLOPS = 300e12  # achieved bf16 dense rate of an H100-class GPU on 512-token windows (~30% of peak)
GPU_FACTOR_FLOPS = 1e12  # achieved float32 rate of eigh/SVD (cuSOLVER runs these far below matmul peak)
NVLINK_BYTES = 300e9  # NCCL bus bandwidth inside an 8-GPU node
NETWORK_BYTES = 40e9  # per GPU across nodes (one 400 Gb/s NIC per GPU)
CALIBRATION_PASSES = 12  # FLOPs per parameter per token: Fisher forward 2 + block-wise backward (forward again 2, backward 4)
#                          + statistics forward 2 + closed-loop forward 2


def factor_flops(shape) -> float:
    """fwhiten on an m x n matrix: eigh of the n x n input Gram (~9 n^3) and an SVD of the weighted m x n matrix (~10 m n min)."""
    m, n = shape
    return 9.0 * n ** 3 + 10.0 * m * n * min(m, n)


def block_comm_bytes(shapes, ratio: float) -> tuple[float, float]:
    """(bytes all-reduced, bytes broadcast) per block: per target a float32 Fisher (m n) and a float64 Gram (n^2) plus
    two float64 vectors; the factors, float32, about ratio x m n."""
    reduced = sum(4 * m * n + 8 * n * n + 16 * n for m, n in shapes)
    broadcast = sum(4 * ratio * m * n for m, n in shapes)
    return reduced, broadcast


def scaling_model(windows: int, window: int, ratio: float) -> list[dict]:
    from lmshrink.distributed import pack_by_cost

    rows = []
    for name, (shapes, blocks) in MODELS.items():
        block_params = sum(m * n for m, n in shapes)
        flops = [factor_flops(s) for s in shapes]
        reduced, broadcast = block_comm_bytes(shapes, ratio)
        for gpus in (1, 8, 64):
            calibration = CALIBRATION_PASSES * block_params * window * -(-windows // gpus) / GPU_MATMUL_FLOPS  # windows split
            owners = pack_by_cost(flops, gpus)
            factorize = max(sum(f for f, o in zip(flops, owners) if o == r) for r in range(gpus)) / GPU_FACTOR_FLOPS
            bandwidth = NVLINK_BYTES if gpus <= 8 else NETWORK_BYTES
            comm = 0.0 if gpus == 1 else (2 * (gpus - 1) / gpus * reduced + broadcast) / bandwidth
            total = blocks * (calibration + factorize + comm)
            rows.append({"model": name, "gpus": gpus, "per_block_calibration_s": calibration, "per_block_factorize_s": factorize,
                         "per_block_comm_s": comm, "total_min": total / 60, "comm_share": comm / (calibration + factorize + comm)})
    return rows


def main() -> None:
    from _common import write_results

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratio", type=float, default=0.8)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--data", default="wikitext-2")
    parser.add_argument("--targets", action="append", default=None, help="as compress --targets (default: linears)")
    parser.add_argument("--model-windows", type=int, default=32, help="calibration windows assumed by the scaling model")
    parser.add_argument("--name", default=None, help="results name (default: distributed, or distributed_MODEL for another model)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    name = args.name or ("distributed" if args.model == "smollm2-135m" else f"distributed_{args.model}")
    if args.child:
        child(json.loads(args.child))
        return
    runs = []
    with tempfile.TemporaryDirectory(prefix="lmshrink-dist-bench-") as scratch:
        for processes, threads in ((1, 2), (2, 1)):
            spec = {"model": args.model, "ratio": args.ratio, "windows": args.windows, "window": args.window, "tokens": args.tokens,
                    "data": args.data, "threads": threads, "targets": args.targets or ["linears"], "out": str(Path(scratch) / f"out-{processes}")}
            runs.append(run(spec, processes))
            print(f"{processes} x {threads}: {json.dumps(runs[-1]['phases'])}", file=sys.stderr, flush=True)
    single = runs[0]
    fits = [{"shape": m["shape"], "seconds": m["seconds"], "flops": factor_flops(m["shape"])} for m in single["per_rank"][0]["matrices"]]
    cpu_factor_rate = sum(f["flops"] for f in fits) / sum(f["seconds"] for f in fits)
    model_rows = scaling_model(args.model_windows, args.window, args.ratio)
    table = [[f"{r['processes']} x {r['threads']}", r["phases"]["calibration_s"], r["phases"]["fisher_s"], r["phases"]["factorize_s"],
              r["phases"]["evaluate_s"], r["wall_s"], r["perplexity"]] for r in runs]
    by_shape = {}
    for f in fits:
        by_shape.setdefault(tuple(f["shape"]), []).append(f["seconds"])
    notes = [f"targets: {', '.join(args.targets or ['linears'])}",
             f"{args.model}, fwhiten --ratio {args.ratio}, block by block (closed loop, float32, CPU), {args.windows} calibration windows of "
             f"{args.window} tokens from {args.data}, perplexity on {args.tokens} tokens; statistics cache off. Reduced settings: "
             "the default job calibrates on 32 windows and evaluates 8192 tokens.",
             "calibration = compression time minus factorization (exact-Fisher pass, input statistics, closed-loop forward, "
             "reading blocks and writing shards); fisher is the exact-Fisher pass alone; factorize includes sharing the factors.",
             "per-matrix factorization (1 process, 2 threads), median seconds by shape: "
             + "; ".join(f"{s[0]}x{s[1]}: {sorted(v)[len(v) // 2]:.3f}" for s, v in sorted(by_shape.items())),
             f"achieved CPU factorization rate (9 n^3 + 10 m n min(m, n) FLOPs per matrix): {cpu_factor_rate / 1e9:.3g} GFLOP/s",
             f"per calibration window (every block is calibrated, whatever --targets says; 1 x 2 threads): "
             f"{single['phases']['calibration_s'] / args.windows:.2f} s, of which the exact-Fisher pass "
             f"{single['phases']['fisher_s'] / args.windows:.2f} s"]
    model_table = ["", "## Scaling model (not measured: assumptions below)", "",
                   "| model | GPUs | calibration s/block | factorize s/block | communication s/block | total min | communication share |",
                   "|---|---|---|---|---|---|---|"]
    model_table += [f"| {r['model']} | {r['gpus']} | {r['per_block_calibration_s']:.2f} | {r['per_block_factorize_s']:.2f} | "
                    f"{r['per_block_comm_s']:.2f} | {r['total_min']:.1f} | {100 * r['comm_share']:.0f}% |" for r in model_rows]
    write_results(name, {"runs": runs, "per_matrix": fits, "cpu_factor_flops": cpu_factor_rate, "scaling_model": model_rows,
                                  "assumptions": {"gpu_matmul_flops": GPU_MATMUL_FLOPS, "gpu_factor_flops": GPU_FACTOR_FLOPS,
                                                  "nvlink_bytes_per_s": NVLINK_BYTES, "network_bytes_per_s": NETWORK_BYTES,
                                                  "calibration_flops_per_param_token": CALIBRATION_PASSES,
                                                  "windows": args.model_windows, "window": args.window}},
                  ["run (processes x threads)", "calibration s", "of which Fisher s", "factorize s", "evaluate s", "wall s", "perplexity"],
                  table, notes)
    with open(SCRIPT.parent / "results" / f"{name}.md", "a") as file:
        file.write("\n".join(model_table) + "\n")


if __name__ == "__main__":
    main()
