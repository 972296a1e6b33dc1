"""Batched eigendecomposition of small symmetric matrices: the Jacobi kernel against LAPACK, by matrix size.

Random Gram matrices (B, n, n) in float64, one thread, best of --repeats runs of each. Shows where the lane
Jacobi kernel of lmshrink.decompose.small_eigh pays (the sizes up to JACOBI_MAX_SIZE) and that it agrees
with torch.linalg.eigh.

    python benchmarks/small_eigh.py --batch 16384 --sizes 2 4 6 8 9 10 12 14 16 20
"""

from __future__ import annotations

import argparse

import torch

from lmshrink.decompose import small_eigh

from _common import best_seconds, write_results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16384)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 6, 8, 9, 10, 12, 14, 16, 20])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if small_eigh.jacobi_kernel() is None:
        raise SystemExit("numba cannot be imported here: there is no Jacobi kernel to measure")
    generator = torch.Generator().manual_seed(0)
    rows = []
    for n in args.sizes:
        factors = torch.randn(args.batch, n, 2 * n, dtype=torch.float64, generator=generator)
        gram = factors @ factors.mT
        small_eigh._jacobi(gram[: small_eigh.LANES])  # compile or load the kernel outside the timing
        jacobi = best_seconds(lambda: small_eigh._jacobi(gram), args.repeats)
        lapack = best_seconds(lambda: torch.linalg.eigh(gram), args.repeats)
        values, vectors = small_eigh._jacobi(gram)
        expected = torch.linalg.eigvalsh(gram)
        scale = expected.abs().amax()
        residual = (gram @ vectors - vectors * values[:, None, :]).abs().amax() / scale
        eigenvalue_error = float((values - expected).abs().amax() / scale)
        rows.append({"n": n, "jacobi_us": jacobi / args.batch * 1e6, "lapack_us": lapack / args.batch * 1e6,
                     "speedup": lapack / jacobi, "max_eigenvalue_error": eigenvalue_error,
                     "max_residual": float(residual), "used_by_default": n <= small_eigh.JACOBI_MAX_SIZE})
        print(rows[-1], flush=True)
    write_results(
        "small_eigh", {"batch": args.batch, "repeats": args.repeats, "lanes": small_eigh.LANES, "rows": rows},
        ["n", "Jacobi kernel (us / matrix)", "LAPACK eigh (us / matrix)", "speed-up", "eigenvalue error",
         "residual", "kernel used by batched_eigh"],
        [[r["n"], r["jacobi_us"], r["lapack_us"], r["speedup"], f"{r['max_eigenvalue_error']:.1e}",
          f"{r['max_residual']:.1e}", "yes" if r["used_by_default"] else "no"] for r in rows],
        notes=[f"{args.batch} random float64 Gram matrices per size, one thread, best of {args.repeats} runs.",
               "Errors are relative to the largest eigenvalue: |lambda - LAPACK's| and |A v - lambda v|.",
               f"batched_eigh sends sizes up to JACOBI_MAX_SIZE = {small_eigh.JACOBI_MAX_SIZE} to the kernel."])


if __name__ == "__main__":
    main()
