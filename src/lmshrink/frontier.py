"""The size/quality frontier: several recipes on one model, perplexity against whole-model bytes.

``compare_recipes`` runs each recipe on a fresh copy of the model, with the original and "quantization alone" (every
linear, embedding and output layer quantized to B bits, the ``quantize`` method) as reference points; ``write_comparison``
writes a markdown table, the JSON and a PNG plot (matplotlib, Agg backend) into a directory.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

from lmshrink.errors import InvalidArgument


def _copy(loaded):
    from lmshrink.models import LoadedModel

    return LoadedModel(copy.deepcopy(loaded.model), loaded.family, loaded.tokenizer, loaded.source)


def quantization_alone(loaded, bits: int, group_size: int | None = None):
    """A one-stage recipe: every linear, the embedding and (when the model has one) the output layer at ``bits``."""
    from lmshrink.plan import Plan
    from lmshrink.recipes import Recipe

    candidates = loaded.candidates()
    targets = ["linears", "embedding"] + (["lm_head"] if any(t.group == "lm_head" or t.tied_head for t in candidates) else [])
    return Recipe([Plan(method="quantize", targets=tuple(targets), ratio=1.0, bits=bits, group_size=group_size)],
                  name=f"quantize-{bits}bit" + (f"-g{group_size}" if group_size else ""),
                  description=f"quantization alone: every linear, embedding and output layer at {bits} bits")


def compare_recipes(loaded, recipes: list, corpus, tokens: int = 8192, window: int = 512, quant_bits=(8, 4),
                    quant_group: int | None = None, progress: bool = True, on_stage=None) -> dict:
    """Run each recipe (anything ``load_recipe`` takes) on a copy of ``loaded``; measure params, bytes, perplexity.

    Every recipe is checked against the model before any of them runs. Returns {"model", "data", "protocol",
    "original", "rows"}: one row per recipe, then one per quantization-alone width.
    """
    from lmshrink.accounting import count_bytes, count_params
    from lmshrink.evaluate import corpus_perplexity
    from lmshrink.recipes import apply_recipe, check_recipe, load_recipe

    on_stage = on_stage or (lambda text: None)
    if not loaded.causal:
        raise InvalidArgument("MODEL", "is not a causal language model", "a causal LM (the frontier plots perplexity)")
    plans = [(str(spec), load_recipe(spec)) for spec in recipes]
    plans += [(f"quantize {bits} bits", quantization_alone(loaded, bits, quant_group)) for bits in quant_bits]
    names = [label for label, _ in plans]
    if len(set(names)) != len(names):
        raise InvalidArgument("--recipes", f"{sorted({n for n in names if names.count(n) > 1})} given twice", "each recipe once")
    for label, recipe in plans:
        try:
            check_recipe(loaded, recipe)
        except InvalidArgument as error:
            raise InvalidArgument(f"recipe {label}: {error.argument}", error.problem, error.allowed) from None
    params, held = count_params(loaded.model), count_bytes(loaded.model)
    on_stage("evaluating the original")
    base = corpus_perplexity(loaded, corpus, tokens=tokens, window=window, progress=progress)
    original = {"name": "original", "kind": "original", "params": params, "bytes": held, "bf16_bytes": 2 * params,
                "perplexity": base["perplexity"], "seconds": 0.0}
    rows = []
    for label, recipe in plans:
        on_stage(f"{label}: compressing")
        model = _copy(loaded)
        start = time.perf_counter()
        apply_recipe(model, recipe, corpus, progress=progress, on_stage=on_stage)
        seconds = time.perf_counter() - start
        on_stage(f"{label}: evaluating")
        result = corpus_perplexity(model, corpus, tokens=tokens, window=window, progress=progress)
        size = count_bytes(model.model)
        budget = model.recipe.get("budget")
        rows.append({"name": label, "kind": "quantization alone" if label.startswith("quantize ") else "recipe",
                     "description": recipe.description or recipe.describe(), "params": count_params(model.model),
                     "bytes": size, "bytes_vs_bf16": size / (2 * params), "perplexity": result["perplexity"],
                     "perplexity_vs_original": result["perplexity"] / base["perplexity"], "seconds": seconds,
                     "budget": budget, "stages": model.recipe["applied"]})
        del model
    return {"model": str(loaded.source), "data": corpus.source, "protocol": base.get("protocol"), "tokens": tokens,
            "window": window, "original": original, "rows": rows}


def markdown_table(result: dict) -> str:
    original = result["original"]
    lines = [f"# Size/quality frontier: {result['model']}", "",
             f"Text: {result['data']}. Perplexity: {result['protocol']}.",
             f"Bytes: the weights as held in memory (packed integers, scales and indices included); the original holds "
             f"{original['bytes']:,} bytes ({original['params']:,} parameters; {original['bf16_bytes']:,} bytes in bfloat16).", "",
             "| name | kind | bytes | bytes / bf16 original | perplexity | perplexity / original | seconds |",
             "|---|---|---:|---:|---:|---:|---:|",
             f"| original | original | {original['bytes']:,} | {original['bytes'] / original['bf16_bytes']:.3f} | "
             f"{original['perplexity']:.3f} | 1.000 | - |"]
    for row in result["rows"]:
        lines.append(f"| {row['name']} | {row['kind']} | {row['bytes']:,} | {row['bytes_vs_bf16']:.3f} | {row['perplexity']:.3f} | "
                     f"{row['perplexity_vs_original']:.3f} | {row['seconds']:.1f} |")
    lines += ["", "Recipes:", ""] + [f"- **{row['name']}**: {row['description']}" for row in result["rows"]]
    return "\n".join(lines) + "\n"


def recipe_series(rows: list[dict]) -> dict[str, list[dict]]:
    """The recipe rows as plot series: rows with the same ``family`` (a sweep of amounts and widths) form one line,
    ordered by bytes; a row without one is its own point, under its name."""
    series: dict[str, list[dict]] = {}
    for row in (r for r in rows if r["kind"] == "recipe"):
        series.setdefault(row.get("family") or row["name"], []).append(row)
    return {label: sorted(members, key=lambda r: r["bytes"]) for label, members in series.items()}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    original = result["original"]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    quant = sorted((r for r in result["rows"] if r["kind"] == "quantization alone"), key=lambda r: r["bytes"])
    if quant:
        axes.plot([r["bytes"] / 1e6 for r in quant], [r["perplexity"] for r in quant], "s--", color="tab:gray",
                  label="quantization alone")
        for r in quant:
            axes.annotate(r["name"].replace("quantize ", ""), (r["bytes"] / 1e6, r["perplexity"]), fontsize=8,
                          textcoords="offset points", xytext=(4, 4))
    for family, rows in recipe_series(result["rows"]).items():
        axes.plot([r["bytes"] / 1e6 for r in rows], [r["perplexity"] for r in rows], "o-" if len(rows) > 1 else "o",
                  linewidth=0.8, label=family)
        for r in rows if len(rows) > 1 else ():
            axes.annotate(r.get("point", r["name"]), (r["bytes"] / 1e6, r["perplexity"]), fontsize=6,
                          textcoords="offset points", xytext=(3, -8))
    axes.plot(original["bytes"] / 1e6, original["perplexity"], "*", markersize=14, color="black",
              label="original (as held)")
    axes.axvline(original["bf16_bytes"] / 1e6, linestyle=":", color="black", linewidth=1, label="original's bf16 size")
    values = [original["perplexity"]] + [r["perplexity"] for r in result["rows"] if math.isfinite(r["perplexity"])]
    if max(values) / min(values) > 10:
        axes.set_yscale("log")
    axes.set_xlabel("whole-model bytes (MB)")
    axes.set_ylabel("perplexity")
    axes.set_title(f"{Path(result['model']).name}: perplexity vs bytes", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_comparison(result: dict, directory: Path, stem: str = "frontier") -> list[Path]:
    """``stem``.md, ``stem``.json and ``stem``.png in ``directory`` (an existing folder: the caller stages it)."""
    directory = Path(directory)
    paths = [directory / f"{stem}.md", directory / f"{stem}.json", directory / f"{stem}.png"]
    paths[0].write_text(markdown_table(result))
    paths[1].write_text(json.dumps(result, indent=2, default=str) + "\n")
    plot(result, paths[2])
    return paths
