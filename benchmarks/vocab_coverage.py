"""How much of a model's vocabulary a calibration text uses: what gptq's --rare-share can store at fewer bits.

For each model: distinct tokens in the calibration text (its train split, the model's own tokenizer), and for each
rare share S the share of the evaluation text's first N tokens that fall in the rows kept at full width (the 1 - S of
rows the calibration text counts most, ties as gptq breaks them: lmshrink.methods.gptq.rare_rows).

    python benchmarks/vocab_coverage.py [--models smollm2-135m,gemma3-270m] [--data wikitext-2] [--tokens 16384]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import lmshrink  # noqa: E402
from _common import write_results  # noqa: E402
from lmshrink.frequencies import corpus_frequencies  # noqa: E402
from lmshrink.methods.gptq import rare_rows  # noqa: E402

SHARES = (0.5, 0.6, 0.7, 0.8, 0.9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--data", default="wikitext-2")
    parser.add_argument("--tokens", type=int, default=16384)
    args = parser.parse_args()
    corpus = lmshrink.load_corpus(args.data)
    rows, payload = [], {"data": corpus.source, "tokens": args.tokens, "shares": SHARES, "models": {}}
    for name in args.models.split(","):
        loaded = lmshrink.load_model(name)
        vocab = loaded.model.get_input_embeddings().weight.shape[0]
        counts = corpus_frequencies(loaded, corpus.train, vocab, name=corpus.name).counts
        test = torch.tensor(loaded.encode(corpus.test)[: args.tokens])
        covered = {share: float((~rare_rows(counts, share))[test].float().mean()) for share in SHARES}
        seen = int((counts > 0).sum())
        payload["models"][name] = {"vocab": vocab, "calibration_tokens": int(counts.sum()), "distinct": seen,
                                   "test_tokens_in_common_rows": covered}
        rows.append([name, vocab, int(counts.sum()), seen, *(f"{100 * covered[s]:.2f}%" for s in SHARES)])
        print(name, payload["models"][name], flush=True)
    write_results("vocab_coverage", payload, ["model", "vocabulary", "calibration tokens", "distinct in calibration",
                                              *(f"test tokens in common rows, rare share {s}" for s in SHARES)], rows,
                  notes=[f"Calibration: {args.data} train split, counted with each model's tokenizer; test: the first "
                         f"{args.tokens:,} tokens of its test split.",
                         "Common rows: the 1 - share of rows the calibration text counts most (gptq --rare-share keeps "
                         "them at --bits; the rest go to --rare-bits)."])


if __name__ == "__main__":
    main()
