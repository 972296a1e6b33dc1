"""Rare rows off their calibration text (issue 17): does storing the least-used embedding rows at 2 bits hurt text
that uses other tokens?

    python benchmarks/rare_rows.py [--model smollm2-135m] [--calib wikitext-2] [--texts wikitext-2,ptb,pydoc,stdlib]
        [--tokens 8192] [--variants original,quarter,calibration-only,no-rare-rows]

The built-in quarter stores the embedding/head's rows that the calibration text uses least at 2 bits (80% or 50% of
them, whatever its budget allows). Rows that another text needs may then be among them. Models, all calibrated on
--calib:
  quarter           the built-in quarter as shipped: rows counted in the calibration text and in lmshrink's reference
                    text (Python's prose and code; gptq --rare-reference)
  calibration-only  the same with rows counted in the calibration text alone (--no-rare-reference; the quarter before)
  no-rare-rows      the same stages with the table at 3 bits in every row (no rare_bits); the same budget picks the bits
Each is evaluated, with the original, on the first --tokens test tokens of every --texts text, and every text's share
of tokens that fall in the model's rare rows is counted. If the rare rows hurt a text, the model's perplexity relative
to the original grows there faster than the no-rare-rows model's does.
Writes benchmarks/results/rare_rows_<model>.json and .md; rows of earlier runs (other variants or texts) are kept.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lmshrink  # noqa: E402
from _common import RESULTS, command_line, write_results  # noqa: E402
from lmshrink.accounting import count_bytes, count_params  # noqa: E402
from lmshrink.data import encode_prefix  # noqa: E402
from lmshrink.evaluate import corpus_perplexity  # noqa: E402
from lmshrink.layers.quantized import MixedBitsEmbedding  # noqa: E402
from lmshrink.recipes import BUILTIN_RECIPES, apply_recipe, parse_recipe  # noqa: E402


VARIANTS = ("original", "quarter", "calibration-only", "no-rare-rows")


def recipes(windows: int) -> dict[str, object]:
    """The built-in quarter and its controls, all at ``windows`` calibration windows."""
    quarter = copy.deepcopy(BUILTIN_RECIPES["quarter"])
    quarter["stages"] = [{**stage, "calibration_windows": windows} for stage in quarter["stages"]]
    counted = copy.deepcopy(quarter)
    counted["stages"][-1]["rare_reference"] = False
    control = copy.deepcopy(quarter)
    table = control["stages"][-1]
    for key in ("rare_bits", "rare_share"):
        table.pop(key)
    table["bits"] = 3  # 4 bits in every row does not fit a quarter (frontier_*.md)
    control["description"] = "the built-in quarter's stages with the embedding/head at 3 bits in every row"
    return {"quarter": parse_recipe({**quarter, "name": "quarter"}),
            "calibration-only": parse_recipe({**counted, "name": "quarter, rows counted in the calibration text only"}),
            "no-rare-rows": parse_recipe({**control, "name": "no rare rows (table at 3 bits)"})}


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
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"which of {', '.join(VARIANTS)}")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    variants = args.variants.split(",")
    if set(variants) - set(VARIANTS):
        parser.error(f"--variants: {sorted(set(variants) - set(VARIANTS))} unknown; allowed: {', '.join(VARIANTS)}")
    torch.set_num_threads(args.threads)
    texts = {name: lmshrink.load_corpus(name) for name in args.texts.split(",")}
    calib = lmshrink.load_corpus(args.calib)
    original = lmshrink.load_model(args.model)
    params = count_params(original.model)
    name = f"rare_rows_{args.model}"
    previous = RESULTS / f"{name}.json"
    settings = {"model": args.model, "calib": args.calib, "tokens": args.tokens, "window": args.window, "calibration_windows": args.windows}
    runs = json.loads(previous.read_text())["runs"] if previous.exists() else []
    runs = [run for run in runs if all(run.get(k, settings[k]) == settings[k] for k in settings)]  # same protocol only
    models = {"original": (original, None)} if "original" in variants else {}
    for variant, recipe in recipes(args.windows).items():
        if variant in variants:
            model = lmshrink.LoadedModel(copy.deepcopy(original.model), original.family, original.tokenizer, original.source)
            start = time.perf_counter()
            apply_recipe(model, recipe, calib, progress=False)
            models[variant] = (model, time.perf_counter() - start)
            print(f"{variant}: compressed in {models[variant][1]:.0f} s", flush=True)
    for text_name, corpus in texts.items():
        ids = torch.tensor(encode_prefix(original, corpus.test, args.tokens))
        for variant, (model, seconds) in models.items():
            rare = rare_mask(model.model)
            measured = corpus_perplexity(model, corpus, tokens=args.tokens, window=args.window, progress=False)
            run = {**settings, "variant": variant, "text": text_name, "perplexity": measured["perplexity"],
                   "bytes": count_bytes(model.model), "bytes_vs_bf16": count_bytes(model.model) / (2 * params),
                   "rare_rows": int(rare.sum()) if rare is not None else 0,
                   "share_of_tokens_in_rare_rows": float(rare[ids].float().mean()) if rare is not None else None,
                   "compress_seconds": seconds, "command": command_line(),
                   "stages": getattr(model, "recipe", {}).get("applied") if variant != "original" else None}
            runs = [r for r in runs if (r["variant"], r["text"]) != (variant, text_name)] + [run]
            print(variant, text_name, run["perplexity"], flush=True)
            _write(name, settings, runs)


def _write(name: str, settings: dict, runs: list[dict]) -> None:
    base = {run["text"]: run["perplexity"] for run in runs if run["variant"] == "original"}
    order = {text: i for i, text in enumerate(dict.fromkeys(run["text"] for run in runs))}
    runs = sorted(runs, key=lambda run: (order[run["text"]], VARIANTS.index(run["variant"])))
    rows = [[run["text"], run["variant"], run["bytes_vs_bf16"], run["perplexity"],
             run["perplexity"] / base[run["text"]] if run["text"] in base else None, run["rare_rows"],
             run["share_of_tokens_in_rare_rows"]] for run in runs]
    write_results(name, {**settings, "runs": runs},
                  ["evaluation text", "model", "bytes / bf16", "perplexity", "x original", "rows at 2 bits", "tokens in those rows"], rows,
                  notes=[f"{settings['model']}; every compressed model calibrated on {settings['calib']} ({settings['calibration_windows']} "
                         f"windows of {settings['window']}); evaluation: the first {settings['tokens']} test tokens of each text, "
                         f"windows of {settings['window']}. Each row's command is in the JSON (rows of several runs are merged).",
                         "quarter: the built-in recipe; its 2-bit rows are those the calibration text and lmshrink's reference text "
                         "(Python's prose and code, each text weighing half) use least.",
                         "calibration-only: the same, rows counted in the calibration text alone (the built-in quarter before stop 39).",
                         "no-rare-rows: the same stages, the table at 3 bits in every row; the same budget picks the other bits.",
                         "tokens in those rows: the share of the evaluation text's tokens whose rows the model holds at 2 bits.",
                         "stdlib: Python's standard-library source (its last 10% evaluates); pydoc: the reference manual's topics "
                         "(English prose); the reference text is their first 90%."])


if __name__ == "__main__":
    main()
