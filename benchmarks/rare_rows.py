"""Rare rows off their calibration text (issue 17): does storing the least-used embedding rows at 2 bits hurt text
that uses other tokens?

    python benchmarks/rare_rows.py [--model smollm2-135m] [--calib wikitext-2] [--texts wikitext-2,ptb,pydoc,stdlib] [--tokens 8192]

The built-in quarter stores the embedding/head's rows that the calibration text uses least at 2 bits (80% or 50% of
them, whatever its budget allows). Rows that another text needs may then be among them. Two models, both calibrated
on --calib:
  quarter        the built-in quarter as shipped
  no rare rows   the same stages with the table at 3 bits in every row (no rare_bits); the same budget picks the bits
Each is evaluated, with the original, on the first --tokens test tokens of every --texts text, and every text's share
of tokens that fall in the quarter's rare rows is counted. If the rare rows hurt a text, the quarter's perplexity
relative to the original grows there faster than the no-rare-rows model's does.
Writes benchmarks/results/rare_rows_<model>.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lmshrink  # noqa: E402
from _common import write_results  # noqa: E402
from lmshrink.accounting import count_bytes, count_params  # noqa: E402
from lmshrink.data import encode_prefix  # noqa: E402
from lmshrink.evaluate import corpus_perplexity  # noqa: E402
from lmshrink.layers.quantized import MixedBitsEmbedding  # noqa: E402
from lmshrink.recipes import BUILTIN_RECIPES, apply_recipe, parse_recipe  # noqa: E402


def recipes(windows: int) -> dict[str, object]:
    """The built-in quarter and its no-rare-rows control, both at ``windows`` calibration windows."""
    quarter = copy.deepcopy(BUILTIN_RECIPES["quarter"])
    quarter["stages"] = [{**stage, "calibration_windows": windows} for stage in quarter["stages"]]
    control = copy.deepcopy(quarter)
    table = control["stages"][-1]
    for key in ("rare_bits", "rare_share"):
        table.pop(key)
    table["bits"] = 3  # 4 bits in every row does not fit a quarter (frontier_*.md)
    control["description"] = "the built-in quarter's stages with the embedding/head at 3 bits in every row"
    return {"quarter": parse_recipe({**quarter, "name": "quarter"}),
            "no rare rows": parse_recipe({**control, "name": "no rare rows (table at 3 bits)"})}


def rare_mask(model: torch.nn.Module) -> torch.Tensor | None:
    return next((m.rare for m in model.modules() if isinstance(m, MixedBitsEmbedding)), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calib", default="wikitext-2")
    parser.add_argument("--texts", default="wikitext-2,ptb,pydoc,stdlib")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--windows", type=int, default=16, help="calibration windows")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    texts = {name: lmshrink.load_corpus(name) for name in args.texts.split(",")}
    calib = lmshrink.load_corpus(args.calib)
    original = lmshrink.load_model(args.model)
    params = count_params(original.model)
    models = {"original": (original, None)}
    for name, recipe in recipes(args.windows).items():
        model = lmshrink.LoadedModel(copy.deepcopy(original.model), original.family, original.tokenizer, original.source)
        start = time.perf_counter()
        apply_recipe(model, recipe, calib, progress=False)
        models[name] = (model, time.perf_counter() - start)
        print(f"{name}: compressed in {models[name][1]:.0f} s", flush=True)
    rare = rare_mask(models["quarter"][0].model)
    runs, rows = [], []
    for text_name, corpus in texts.items():
        ids = torch.tensor(encode_prefix(original, corpus.test, args.tokens))
        in_rare = float(rare[ids].float().mean()) if rare is not None else None
        base = None
        for name, (model, seconds) in models.items():
            measured = corpus_perplexity(model, corpus, tokens=args.tokens, window=args.window, progress=False)
            base = base or measured["perplexity"]
            run = {"model": name, "text": text_name, "perplexity": measured["perplexity"], "vs_original": measured["perplexity"] / base,
                   "bytes": count_bytes(model.model), "bytes_vs_bf16": count_bytes(model.model) / (2 * params),
                   "share_of_tokens_in_rare_rows": in_rare, "compress_seconds": seconds,
                   "stages": getattr(model, "recipe", {}).get("applied") if name != "original" else None}
            runs.append(run)
            rows.append([text_name, name, run["bytes_vs_bf16"], run["perplexity"], run["vs_original"], in_rare])
            print(rows[-1], flush=True)
            write_results(f"rare_rows_{args.model}", {"model": args.model, "calib": args.calib, "tokens": args.tokens,
                                                      "window": args.window, "calibration_windows": args.windows,
                                                      "rare_rows": int(rare.sum()) if rare is not None else 0, "runs": runs},
                          ["evaluation text", "model", "bytes / bf16", "perplexity", "x original", "tokens in rare rows"], rows,
                          notes=[f"{args.model}; both compressed models calibrated on {args.calib} ({args.windows} windows of "
                                 f"{args.window}); evaluation: the first {args.tokens} test tokens of each text, windows of {args.window}.",
                                 f"quarter: the built-in recipe; its table holds {int(rare.sum()) if rare is not None else 0:,} of "
                                 f"{len(rare) if rare is not None else 0:,} rows at 2 bits, those {args.calib} uses least.",
                                 "no rare rows: the same stages, the table at 3 bits in every row; the same budget picks the other bits.",
                                 "tokens in rare rows: the share of the evaluation text's tokens whose rows the quarter holds at 2 bits.",
                                 "stdlib: Python's standard-library source (its last 10% evaluates); pydoc: the reference manual's topics (English prose)."])


if __name__ == "__main__":
    main()
