"""The size/quality frontier (issue 17): whole-model perplexity against whole-model bytes (SmolLM2-135M, --model).

    python benchmarks/frontier.py [--data wikitext-2] [--eval-tokens 4096] [--calibration-windows 8] [--bits 8,4]
                                  [--ratios 0.8,0.5] [--only quant,lowrank,groupreduce,tt]

Points: the original; quantization alone (every linear, the tied embedding/head; 8/6/4/3 bits, groups of 64
columns); and recipes, each with its factors quantized to every --bits width (groups of 64; "bf16": factors not
quantized, held in bfloat16: every float parameter rounded to bfloat16 in place and counted at 2 bytes), at every
--ratios ratio r (the share of the parameters the embedding/head and the linears each keep):
  lowrank          svd on the embedding/head (ratio r) + fwhiten on the linears (ratio r, sensitivity)
  groupreduce      groupreduce on the embedding/head (ratio r) + the same linears
  tt               tt (TensorGPT) on the embedding/head (ratio r) + the same linears
  fwhiten          the embedding/head quantized at the same width + fwhiten on the linears (ratio 0.8, sensitivity)
  channels         the embedding/head quantized at the same width + the built-in channels recipe's linears
                   (nystrom MLP channels at 0.8 uniform, fwhiten attention at 0.8 sensitivity)
  gptq             every linear, then the tied embedding/head, quantized by gptq (rounding errors compensated on
                   calibration inputs; the table by the head's inputs) at the same width
  channels-gptq    the channels recipe's linears with factors at that width, then the table by gptq
  gptq-mix         (one point) attention by gptq at 5 bits, MLPs at 4, then the table at 3: about 25% of bf16
  gptq-mix-4       (one point) the same with attention at 4 bits
  half, quarter    the built-in recipes of those names, with their whole-model budgets (lmshrink methods)
  quarter-rare     a fixed quarter: gptq attention 6 bits, nystrom MLP 5 bits, table 4 bits with 80% rare rows at 2
  quarter-rare-half  the built-in quarter with rare_share 0.5
  channels-gptq-mix  (one point) the channels recipe's linears with 4-bit factors, then the table by gptq at 3 bits
Bytes are the whole model as held (packed integers, float16 scales/minimums, indices; the rest float32).
Single-threaded (the machine is shared). Results are rewritten after every point, so a partial run still leaves a
valid report: benchmarks/results/frontier.json, frontier.md, frontier.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lmshrink  # noqa: E402
from _common import RESULTS, command_line, environment, peak_rss_mib  # noqa: E402
from lmshrink.accounting import count_bytes, count_params  # noqa: E402
from lmshrink.evaluate import corpus_perplexity  # noqa: E402
from lmshrink.frontier import markdown_table, plot, quantization_alone  # noqa: E402
from lmshrink.recipes import BUILTIN_RECIPES, apply_recipe, load_recipe, parse_recipe  # noqa: E402

GROUP = 64
BF16_NOTE = "; factors not quantized, every float value held in bfloat16"
SWEPT = {"lowrank": "low rank (svd table + fwhiten linears)", "groupreduce": "groupreduce table + fwhiten linears",
         "tt": "tt table + fwhiten linears"}


def recipes(bits_list, calibration_windows: int, only: set[str], ratios=(0.8, 0.5)) -> list[tuple[str, object]]:
    """(name, recipe) for every family in ``only``; a width of None: factors not quantized (held in bfloat16)."""
    linears = {"targets": ["linears"], "method": "fwhiten", "ratio": 0.8, "allocation": "sensitivity",
               "calibration_windows": calibration_windows}
    out = []
    for bits in bits_list:
        width = {} if bits is None else {"bits": bits, "group_size": GROUP}
        label = "bf16" if bits is None else f"{bits}-bit"
        for family, embedding in (("lowrank", {"method": "svd"}), ("groupreduce", {"method": "groupreduce"}), ("tt", {"method": "tt"})):
            for ratio in ratios if family in only else ():  # the embedding/head and the linears at one ratio
                stages = [{"targets": ["embedding", "lm_head"], "ratio": ratio, **width, **embedding},
                          {**linears, "ratio": ratio, **width}]
                if family == "groupreduce":
                    stages[0]["calibration_windows"] = calibration_windows  # token counts come from the same text
                name = f"{family} {ratio:g} {label}"
                out.append((name, parse_recipe({"name": name, "stages": stages})))
        if bits is None:  # the families below quantize the table: they need a width
            continue
        for family in ("fwhiten", "channels"):
            if family not in only:
                continue
            stages = [{"targets": ["embedding", "lm_head"], "method": "quantize", "ratio": 1, **width}, {**linears, **width}]
            if family == "channels":
                stages[1:] = [{**linears, "targets": ["mlp"], "method": "nystrom", "allocation": "uniform", "bits": bits, "group_size": GROUP},
                              {**linears, "targets": ["attention"], "bits": bits, "group_size": GROUP}]
            name = f"{family} {bits}-bit"
            out.append((name, parse_recipe({"name": name, "stages": stages})))
        if "gptq" in only:  # quantization with error compensation, the same bits everywhere
            gptq = {"method": "gptq", "ratio": 1, "bits": bits, "group_size": GROUP, "calibration_windows": calibration_windows}
            out.append((f"gptq {bits}-bit", parse_recipe({"name": f"gptq {bits}-bit", "stages": [
                {"targets": ["linears"], **gptq}, {"targets": ["embedding", "lm_head"], **gptq}]})))
        if "channels-gptq" in only:  # the channels recipe's linears, factors at these bits; the table by gptq
            out.append((f"channels+gptq {bits}-bit", parse_recipe({"name": f"channels+gptq {bits}-bit", "stages": [
                {**linears, "targets": ["mlp"], "method": "nystrom", "allocation": "uniform", "bits": bits, "group_size": GROUP},
                {**linears, "targets": ["attention"], "bits": bits, "group_size": GROUP},
                {"targets": ["embedding", "lm_head"], "method": "gptq", "ratio": 1, "bits": bits, "group_size": GROUP,
                 "calibration_windows": calibration_windows}]})))
    if "channels-gptq-mix" in only:  # low rank at a quarter of the bf16 bytes: channels linears at 4 bits, the table at 3
        out.append(("channels+gptq 4/3-bit", parse_recipe({"name": "channels+gptq 4/3-bit", "stages": [
            {**linears, "targets": ["mlp"], "method": "nystrom", "allocation": "uniform", "bits": 4, "group_size": GROUP},
            {**linears, "targets": ["attention"], "bits": 4, "group_size": GROUP},
            {"targets": ["embedding", "lm_head"], "method": "gptq", "ratio": 1, "bits": 3, "group_size": GROUP,
             "calibration_windows": calibration_windows}]})))
    for builtin in ("half", "quarter"):  # the built-in recipes as shipped (their budgets), at these calibration windows
        if builtin in only:
            recipe = load_recipe(builtin)
            recipe.stages = [replace(plan, calibration_windows=calibration_windows) for plan in recipe.stages]
            out.append((f"built-in {builtin}", recipe))
    if "quarter-rare-half" in only:  # the built-in quarter with half the table's rows rare, whatever the budget allows
        data = copy.deepcopy(BUILTIN_RECIPES["quarter"])
        data["stages"] = [{**stage, "calibration_windows": calibration_windows, **({"rare_share": 0.5} if "rare_share" in stage else {})}
                          for stage in data["stages"]]
        out.append(("built-in quarter, rare share 0.5", parse_recipe({**data, "name": "built-in quarter, rare share 0.5"})))
    if "quarter-rare" in only:  # a quarter with the table's rarest rows at 2 bits, paying for more bits elsewhere
        out.append(("quarter, rare rows at 2 bits", parse_recipe({"name": "quarter, rare rows at 2 bits", "bf16_fraction": 0.25, "stages": [
            {"targets": ["attention"], "method": "gptq", "ratio": 1, "bits": 6, "group_size": GROUP, "calibration_windows": calibration_windows},
            {"targets": ["mlp"], "method": "nystrom", "ratio": 1, "bits": 5, "group_size": GROUP, "calibration_windows": calibration_windows},
            {"targets": ["embedding", "lm_head"], "method": "gptq", "ratio": 1, "bits": 4, "rare_bits": 2, "rare_share": 0.8,
             "group_size": GROUP, "calibration_windows": calibration_windows}]})))
    for family, attention in (("gptq-mix", 5), ("gptq-mix-4", 4)):  # about a quarter: table 3 bits, MLPs 4, attention 5 or 4
        if family in only:
            gptq = {"method": "gptq", "ratio": 1, "group_size": GROUP, "calibration_windows": calibration_windows}
            out.append((f"gptq 3/{attention}/4-bit", parse_recipe({"name": f"gptq 3/{attention}/4-bit", "stages": [
                {"targets": ["attention"], "bits": attention, **gptq}, {"targets": ["mlp"], "bits": 4, **gptq},
                {"targets": ["embedding", "lm_head"], "bits": 3, **gptq}]})))
    return out


def sweep_point(name: str) -> dict:
    """A swept family's row names its family (one line in the plot) and its point on it ("0.8 4-bit")."""
    family, _, point = name.partition(" ")
    return {"family": SWEPT[family], "point": point} if family in SWEPT else {}


def hold_in_bf16(model: torch.nn.Module) -> int:
    """Round every float32 tensor the model stores to bfloat16 in place; return its bytes with those at 2 bytes each.

    Rounding in place (rather than ``model.to(bfloat16)``) keeps the float32 arithmetic and leaves unsaved buffers
    (rotary frequencies) as they are: the perplexity is that of the bfloat16 values a saved model would hold.
    """
    size = 0
    with torch.no_grad():
        for tensor in {id(t): t for t in model.state_dict(keep_vars=True).values()}.values():
            if tensor.dtype == torch.float32:
                tensor.copy_(tensor.to(torch.bfloat16))
                size += 2 * tensor.numel()
            else:
                size += tensor.numel() * tensor.element_size()
    return size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="wikitext-2")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--calibration-windows", type=int, default=8)
    parser.add_argument("--bits", default="8,4", help="factor widths of the recipes; bf16: not quantized")
    parser.add_argument("--ratios", default="0.8,0.5", help="ratios of the lowrank, groupreduce and tt families")
    parser.add_argument("--quant-bits", default="8,6,4,3", help="widths of quantization alone")
    parser.add_argument("--only", default="quant,lowrank,groupreduce,tt")
    parser.add_argument("--stem", default="frontier")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    parser.add_argument("--keep-from", default=None,
                        help="an earlier frontier JSON with the same model and protocol: its rows that this run does not make "
                             "are kept, and its original's perplexity when the original is the same")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    only = set(args.only.split(","))
    corpus = lmshrink.load_corpus(args.data)
    loaded = lmshrink.load_model(args.model)
    params = count_params(loaded.model)
    kept = json.loads(Path(args.keep_from).read_text()) if args.keep_from else None
    if kept and (kept["model"], kept["tokens"], kept["window"]) != (args.model, args.eval_tokens, args.window):
        raise SystemExit(f"--keep-from {args.keep_from}: another model or evaluation protocol")
    start = time.perf_counter()
    if kept and kept["original"]["bytes"] == count_bytes(loaded.model):  # the same original: its perplexity is kept too
        base = {"perplexity": kept["original"]["perplexity"], "protocol": kept["protocol"]}
    else:
        base = corpus_perplexity(loaded, corpus, tokens=args.eval_tokens, window=args.window, progress=False)
    result = {"model": args.model, "data": corpus.source, "protocol": base["protocol"], "tokens": args.eval_tokens,
              "window": args.window, "settings": {"calibration_windows": args.calibration_windows, "group_size": GROUP,
                                                  "threads": args.threads, "reduced": "eval tokens / calibration windows as given"},
              "command": command_line(), "environment": environment(),
              "original": {"name": "original", "kind": "original", "params": params, "bytes": count_bytes(loaded.model),
                           "bf16_bytes": 2 * params, "perplexity": base["perplexity"], "seconds": time.perf_counter() - start},
              "rows": []}
    print(f"original: {base['perplexity']:.3f} ({count_bytes(loaded.model):,} bytes)", flush=True)
    points = []
    if "quant" in only:
        points += [(f"quantize {b} bits", quantization_alone(loaded, b, GROUP)) for b in map(int, args.quant_bits.split(","))]
    points += recipes([None if b == "bf16" else int(b) for b in args.bits.split(",")], args.calibration_windows, only,
                      [float(r) for r in args.ratios.split(",")])
    if kept:
        names = {name for name, _ in points}
        result["rows"] += [row for row in kept["rows"] if row["name"] not in names]
        result["kept_from"] = {"rows": [row["name"] for row in kept["rows"] if row["name"] not in names],
                               "command": kept.get("command"), "kept_from": kept.get("kept_from")}
    for name, recipe in points:
        model = lmshrink.LoadedModel(copy.deepcopy(loaded.model), loaded.family, loaded.tokenizer, loaded.source)
        start = time.perf_counter()
        apply_recipe(model, recipe, corpus, progress=False)
        seconds = time.perf_counter() - start
        in_bf16 = recipe.name.endswith(" bf16")
        size = hold_in_bf16(model.model) if in_bf16 else count_bytes(model.model)
        measured = corpus_perplexity(model, corpus, tokens=args.eval_tokens, window=args.window, progress=False)
        result["rows"].append({"name": name, "kind": "quantization alone" if name.startswith("quantize") else "recipe",
                               "description": (recipe.description or recipe.describe()) + (BF16_NOTE if in_bf16 else ""),
                               "params": count_params(model.model),
                               "bytes": size, "bytes_vs_bf16": size / (2 * params), "perplexity": measured["perplexity"],
                               "perplexity_vs_original": measured["perplexity"] / base["perplexity"], "seconds": seconds,
                               "stages": model.recipe["applied"], "budget": model.recipe.get("budget"), "peak_rss_mib": peak_rss_mib(),
                               **sweep_point(name)})
        print(f"{name}: {measured['perplexity']:.3f} at {size:,} bytes ({size / (2 * params):.3f} of bf16) in {seconds:.0f} s",
              flush=True)
        del model
        _write(result, args.stem)


def _write(result: dict, stem: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    note = (f"\nSettings: {result['tokens']} evaluation tokens, {result['settings']['calibration_windows']} calibration windows "
            f"of {result['window']} tokens (reduced from the defaults 8192 / 32), factor groups of {GROUP} columns, "
            f"{result['settings']['threads']} thread(s). Command: `{result['command']}`\n")
    (RESULTS / f"{stem}.md").write_text(markdown_table(result) + note)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    plot(result, RESULTS / f"{stem}.png")


if __name__ == "__main__":
    main()
