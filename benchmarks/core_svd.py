"""Core baseline: SmolLM2-135M, all attention/MLP linears, plain truncated SVD at several --ratio values.

Measures WikiText-2 test perplexity (first N tokens, window 512), compression wall time against the sum of
bare torch.linalg.svd calls on the same matrices, forward tokens/s dense vs compressed, and peak RSS.

    python benchmarks/core_svd.py --ratios 1.0 0.9 0.8 0.6 --tokens 16384
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import lmshrink
from lmshrink.evaluate import corpus_perplexity, throughput
from lmshrink.plan import select_targets

from _common import peak_rss_mib, write_results


def bare_svd_seconds(loaded, targets) -> float:
    """Time of torch.linalg.svd alone on every targeted matrix: the floor for any SVD-based compression."""
    total = 0.0
    for target in select_targets(loaded.candidates(), targets):
        weight = target.weight().detach().float()
        start = time.perf_counter()
        torch.linalg.svd(weight, full_matrices=False)
        total += time.perf_counter() - start
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="wikitext-2")
    parser.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.9, 0.8, 0.6])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--method", default="svd")
    parser.add_argument("--repeats", type=int, default=3, help="timing pairs (bare SVD, compress) per ratio; medians reported")
    args = parser.parse_args()

    corpus = lmshrink.load_corpus(args.data)
    pristine = lmshrink.load_model(args.model)
    targets = ("linears",)
    dense_ppl = corpus_perplexity(pristine, corpus, args.tokens, args.window, progress=False)
    dense_speed = throughput(pristine)
    rows, results = [], []
    rows.append(["dense", "-", lmshrink.accounting.count_params(pristine.model), f"{dense_ppl['perplexity']:.3f}",
                 "-", "-", "-", f"{dense_speed['tokens_per_s']:.1f}"])
    for ratio in args.ratios:
        bares, seconds = [], []
        for _ in range(args.repeats):  # interleaved pairs: both sides see the same machine load
            loaded = lmshrink.LoadedModel(copy.deepcopy(pristine.model), pristine.family, pristine.tokenizer, pristine.source)
            bares.append(bare_svd_seconds(loaded, targets))
            report = lmshrink.compress(loaded, lmshrink.Plan(method=args.method, ratio=ratio, targets=targets), progress=False)
            seconds.append(report.seconds)
        bare, compress_seconds = statistics.median(bares), statistics.median(seconds)
        ppl = corpus_perplexity(loaded, corpus, args.tokens, args.window, progress=False)
        speed = throughput(loaded)
        entry = {"ratio": ratio, "method": args.method, "params": report.params_after, "params_dense": report.params_before,
                 "factorized": len(report.compressed), "targets": len(report.modules), "perplexity": ppl["perplexity"],
                 "eval_tokens": ppl["tokens"], "compress_seconds": compress_seconds, "bare_svd_seconds": bare,
                 "overhead": compress_seconds / bare, "compress_seconds_all": seconds, "bare_svd_seconds_all": bares, "tokens_per_s": speed["tokens_per_s"]}
        results.append(entry)
        rows.append([args.method, ratio, report.params_after, f"{ppl['perplexity']:.4g}", f"{compress_seconds:.2f}",
                     f"{bare:.2f}", f"{entry['overhead']:.2f}", f"{speed['tokens_per_s']:.1f}"])
        print(entry, flush=True)
        del loaded
    write_results(
        f"core_{args.method}",
        {"model": args.model, "data": corpus.source, "window": args.window, "dense": {"perplexity": dense_ppl["perplexity"],
         "eval_tokens": dense_ppl["tokens"], "tokens_per_s": dense_speed["tokens_per_s"]}, "runs": results,
         "peak_rss_mib": peak_rss_mib()},
        ["method", "ratio", "params", f"ppl ({dense_ppl['tokens']} tok)", "compress s", "bare SVD s", "overhead", "tokens/s"],
        rows,
        [f"Model {args.model}; targets: all attention and MLP linears (210 matrices); WikiText-2 test, first "
         f"{args.tokens} tokens, non-overlapping windows of {args.window}.",
         "`--ratio R`: each matrix keeps R times its dense parameters (k (m+n) <= R m n); at R = 1.0 square matrices "
         "stay dense and the rectangular MLP matrices get rank floor(mn/(m+n)) (418 of 576), which is lossy.",
         f"overhead = lmshrink compress wall time / sum of bare torch.linalg.svd times on the same matrices (float32); "
         f"medians of {args.repeats} interleaved (bare, compress) pairs on fresh copies of the model.",
         "tokens/s: forward pass of 1 x 256 tokens, median of 5 after 1 warm-up.",
         f"Peak RSS of the whole run: {peak_rss_mib():.0f} MiB."],
    )


if __name__ == "__main__":
    main()
