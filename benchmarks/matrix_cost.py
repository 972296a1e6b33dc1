"""What factorizing one matrix costs, by method and shape: the measure behind the distributed packing.

Torchrun runs pack each block's matrices onto the processes by an estimated cost (lmshrink.distributed.matrix_cost,
packed by pack_by_cost). This times each method's factorization (one thread, best of --repeats, random
weights and calibration statistics of the right shapes) on the linears of one SmolLM2-135M and one Gemma-3-270M
block, and compares two estimates, lmshrink's matrix_cost and an SVD's m·n·min(m, n): how much of the measured time
each predicts, and the makespan of the longest-processing-time packing that each gives on 2 and 4 processes against the best possible.

    python benchmarks/matrix_cost.py --methods svd svdllm fwhiten
"""

from __future__ import annotations

import argparse

import torch

from lmshrink.distributed import matrix_cost, pack_by_cost
from lmshrink.methods import get_method

from _common import best_seconds, write_results

BLOCKS = {  # (out, in) of a decoder block's linears
    "smollm2-135m": {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
                     "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)},
    "gemma3-270m": {"q_proj": (1024, 640), "k_proj": (256, 640), "v_proj": (256, 640), "o_proj": (640, 1024),
                    "gate_proj": (2048, 640), "up_proj": (2048, 640), "down_proj": (640, 2048)},
}


def statistics(m: int, n: int, generator: torch.Generator) -> dict:
    """Calibration statistics of a plausible shape: a Gram of 4n correlated inputs, a positive Fisher."""
    inputs = torch.randn(4 * n, n, generator=generator, dtype=torch.float64) @ torch.randn(n, n, generator=generator, dtype=torch.float64)
    gram = inputs.T @ inputs / inputs.shape[0]
    return {"input_gram": gram, "input_sq_mean": gram.diagonal().clone(), "input_abs_mean": inputs.abs().mean(0),
            "fisher": torch.rand(m, n, generator=generator) + 1e-3}


def makespan(owners: list[int], seconds: list[float], size: int) -> float:
    loads = [0.0] * size
    for owner, value in zip(owners, seconds):
        loads[owner] += value
    return max(loads)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["svd", "svdllm", "fwhiten"])
    parser.add_argument("--ratio", type=float, default=0.8, help="rank: this share of a matrix's parameters")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--name", default="matrix_cost")
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    rows, records, packing = [], [], []
    for model, block in BLOCKS.items():
        stats = {name: statistics(m, n, generator) for name, (m, n) in block.items()}
        weights = {name: torch.randn(m, n, generator=generator) / n ** 0.5 for name, (m, n) in block.items()}
        for method_name in args.methods:
            method = get_method(method_name)
            options = method.resolve_options(None)
            seconds, estimates, plain = [], [], []
            for name, (m, n) in block.items():
                rank = max(1, int(args.ratio * m * n / (m + n)))
                took = best_seconds(lambda: method.function(weights[name], rank, stats[name], options), args.repeats)
                seconds.append(took)
                estimates.append(matrix_cost((m, n)))
                plain.append(m * n * min(m, n))
                records.append({"model": model, "method": method_name, "matrix": name, "shape": [m, n], "rank": rank,
                                "seconds": took, "matrix_cost": estimates[-1], "svd_cost": plain[-1]})
            total = sum(seconds)
            for index, name in enumerate(block):
                rows.append([model, method_name, name, f"{block[name][0]}x{block[name][1]}", seconds[index],
                             seconds[index] / total, estimates[index] / sum(estimates), plain[index] / sum(plain)])
            for size in (2, 4):
                best = max(max(seconds), total / size)  # a lower bound on any packing's makespan
                packing.append({"model": model, "method": method_name, "processes": size, "lower_bound_s": best,
                                "matrix_cost_s": makespan(pack_by_cost(estimates, size), seconds, size),
                                "svd_cost_s": makespan(pack_by_cost(plain, size), seconds, size)})
    table = rows + [[p["model"], p["method"], f"packed on {p['processes']}", "makespan s: lower bound / by matrix_cost / "
                     "by m·n·min(m,n)", p["lower_bound_s"], None, p["matrix_cost_s"], p["svd_cost_s"]] for p in packing]
    write_results(args.name, {"ratio": args.ratio, "repeats": args.repeats, "matrices": records, "packing": packing},
                  ["model", "method", "matrix", "shape", "seconds", "share measured", "share by matrix_cost",
                   "share by m·n·min(m,n)"], table,
                  [f"Random weights and statistics; rank keeps {args.ratio} of each matrix's parameters; one thread, best of "
                   f"{args.repeats}.",
                   "matrix_cost = m·n·min(m, n) + n³/8 for an m x n (out x in) matrix; its n³ term was fitted to this benchmark's "
                   "first run (relative least squares: 0.13, 0.12 and 0.08 of m·n·min(m, n)'s weight for svd, svdllm, fwhiten).",
                   "Packing rows: the makespan (slowest process's measured seconds) of the longest-processing-time packing "
                   "by each estimate, and the lower bound max(largest matrix, total / processes)."])


if __name__ == "__main__":
    main()
