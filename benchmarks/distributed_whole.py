"""The whole-model path under torchrun (issue 14): 1 process x 2 threads against 2 processes x 1 thread on this
machine, each a `lmshrink compress --json --no-save` child; the phases come from the command's own JSON
(calibration_seconds, compression_seconds) and the wall time of the child.

    python benchmarks/distributed_whole.py [--model smollm2-135m] [--ratio 0.8] [--windows 8] [--tokens 4096]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def run(processes: int, args) -> dict:
    env = {**os.environ, "LMSHRINK_NO_STATS_CACHE": "1", "OMP_NUM_THREADS": str(2 // processes)}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), "-m", "lmshrink"]
                if processes > 1 else [sys.executable, "-m", "lmshrink"])
    command = [*launcher, "--threads", str(2 // processes), "compress", args.model, "--method", "fwhiten", "--ratio", str(args.ratio),
               "--calibration-windows", str(args.windows), "--tokens", str(args.tokens), "--json", "--no-save"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    result = json.loads(done.stdout)
    return {"processes": processes, "threads_each": 2 // processes, "wall_s": round(wall, 1),
            "calibration_s": round(result["calibration_seconds"], 1),
            "factorize_s": round(result["compression_seconds"] - result["calibration_seconds"], 1),
            "perplexity_before": result["perplexity"]["before"], "perplexity_after": result["perplexity"]["after"],
            "command": " ".join(command[command.index("compress") - 2:])}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratio", type=float, default=0.8)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=4096)
    args = parser.parse_args()
    rows = [run(1, args), run(2, args)]
    one, two = rows
    summary = {"model": args.model, "ratio": args.ratio, "windows": args.windows, "tokens": args.tokens, "rows": rows,
               "calibration_ratio_2p_over_1p": round(two["calibration_s"] / one["calibration_s"], 3),
               "factorize_ratio_2p_over_1p": round(two["factorize_s"] / one["factorize_s"], 3),
               "wall_ratio_2p_over_1p": round(two["wall_s"] / one["wall_s"], 3)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "distributed_whole.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [f"# Whole-model path under torchrun: {args.model}, fwhiten, ratio {args.ratio}, {args.windows} calibration windows, "
             f"{args.tokens} evaluation tokens (built-in text)", "",
             "| processes x threads | wall s | calibration s | factorization s | perplexity before | after |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['processes']} x {r['threads_each']} | {r['wall_s']} | {r['calibration_s']} | {r['factorize_s']} | "
              f"{r['perplexity_before']:.3f} | {r['perplexity_after']:.3f} |" for r in rows]
    lines += ["", f"2 processes / 1 process: calibration {summary['calibration_ratio_2p_over_1p']}, factorization "
              f"{summary['factorize_ratio_2p_over_1p']}, wall {summary['wall_ratio_2p_over_1p']} (one run each, on this shared 2-core "
              "machine; wall includes loading, evaluating before and after, and rank 0's sampling and timing)", "",
              f"Command: `python benchmarks/distributed_whole.py --model {args.model} --ratio {args.ratio} --windows {args.windows} "
              f"--tokens {args.tokens}`"]
    (RESULTS / "distributed_whole.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
