"""How hard nystrom's refit may lean on the calibration text: the ridge (``channel_damping``, a fraction of the hidden
channels' mean second moment) pulls the refitted down projection toward the plain pruned columns. Small: the best
fit to the calibration text; large: plain pruning. Measured on SmolLM2-135M's MLPs alone (attention dense), at one
share of channels, for calibration on WikiText-2 and on another text, evaluated on WikiText-2; plus greedy samples
(how often a generation repeats one token 4 or more times in a row, the failure the default job's candidate showed).

    python benchmarks/channel_damping.py --dampings 1e-4 1e-2 1e-1 1 --calib wikitext-2 ptb
    python benchmarks/channel_damping.py --dampings 1e-4 --calib wikitext-2 --sampled 0.125 0.25 0.5

``--sampled S``: that share of the calibration windows sampled from the model itself (as ``--data TEXT+self`` does
with one half). WikiText-2 has no bare newline tokens at all (its line breaks are " \n"), which the model's own text
is full of.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import time

import torch

import lmshrink
from lmshrink.evaluate import corpus_perplexity

from _common import peak_rss_mib, write_results


def prompts(corpus, count: int = 24) -> list[str]:
    lines = [l.strip() for l in corpus.test.splitlines() if len(l.strip()) > 200 and not l.strip().startswith("=")]
    return ["The capital of France is", "Once upon a time", "def fibonacci(n):"] + [" ".join(l.split()[:12]) for l in lines[:count - 3]]


def repeats(loaded, texts: list[str], new_tokens: int = 24) -> int:
    """Greedy generations (of ``new_tokens``) that repeat one token 4 or more times in a row."""
    count = 0
    for prompt in texts:
        ids = loaded.tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            new = loaded.model.generate(ids, max_new_tokens=new_tokens, do_sample=False)[0][ids.shape[1]:].tolist()
        count += max(len(list(group)) for _, group in itertools.groupby(new)) >= 4
    return count


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratio", type=float, default=0.8, help="share of each MLP's channels kept")
    parser.add_argument("--dampings", type=float, nargs="+", default=[1e-4, 1e-2, 1e-1, 1.0])
    parser.add_argument("--calib", nargs="+", default=["wikitext-2", "ptb"], help="calibration texts")
    parser.add_argument("--sampled", type=float, nargs="+", default=[0.0], help="shares of self-sampled calibration windows")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=8192, help="WikiText-2 test tokens for perplexity")
    parser.add_argument("--name", default="channel_damping")
    args = parser.parse_args()

    evaluation = lmshrink.load_corpus("wikitext-2")
    texts = prompts(evaluation)
    pristine = lmshrink.load_model(args.model)

    def ppl(loaded):
        return corpus_perplexity(loaded, evaluation, args.tokens, 512, progress=False)["perplexity"]

    dense = ppl(pristine)
    rows = [["dense", "-", "-", "-", dense, 1.0, repeats(pristine, texts), "-"]]
    results = []
    for calib, sampled, damping in itertools.product(args.calib, args.sampled, args.dampings):
        loaded = lmshrink.LoadedModel(copy.deepcopy(pristine.model), pristine.family, pristine.tokenizer, pristine.source)
        plan = lmshrink.Plan(method="nystrom", targets=("mlp",), ratio=args.ratio, calibration_windows=args.windows,
                             options={"channel_damping": damping})
        start = time.perf_counter()
        lmshrink.compress(loaded, plan, data=dataclasses.replace(lmshrink.load_corpus(calib), sampled=sampled), progress=False)
        seconds = time.perf_counter() - start
        value = ppl(loaded)
        loops = repeats(loaded, texts)
        results.append({"calibration": calib, "sampled": sampled, "damping": damping, "perplexity": value, "repeats": loops, "seconds": seconds})
        rows.append([calib, sampled, damping, args.ratio, value, value / dense, loops, seconds])
        print(rows[-1], flush=True)
    write_results(args.name, {"model": args.model, "ratio": args.ratio, "windows": args.windows, "eval_tokens": args.tokens,
                              "dense_perplexity": dense, "prompts": texts, "rows": results, "peak_rss_mib": peak_rss_mib()},
                  ["calibration text", "self-sampled share", "channel_damping", "MLP channels kept", f"WikiText-2 ppl ({args.tokens} tok)", "x dense",
                   f"greedy generations with a 4x repeat (of {len(texts)})", "compress s"], rows,
                  [f"{args.model}: only the MLPs compressed (nystrom, uniform share); attention and embedding dense. "
                   f"Calibration: {args.windows} windows of 512 tokens from the calibration text's train split.",
                   "Greedy: 24 new tokens after each of the prompts in the JSON (3 fixed, the rest from WikiText-2 test).",
                   "Ridge: W_S = W C'[:, S] C'[S, S]^-1 with C' = C + damping x mean(diag C) I; large damping tends to "
                   "plain pruning (W_S = W[:, S]).",
                   f"Peak RSS {peak_rss_mib():.0f} MiB."])


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
