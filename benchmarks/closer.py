"""Closer to dense (issue 15): which lever buys what, at equal parameter budgets, on a real model.

    python benchmarks/closer.py [--model smollm2-135m] [--ratios 0.8] [--variants whole,closed,refit] [--calib wikitext-2]

Variants (all fwhiten + sensitivity allocation unless --method says otherwise):
  whole   the whole-model path (lmshrink.compress), float32: the pipeline before this issue
  open    block by block, each block calibrated on the original model's activations
  closed  block by block, each block calibrated on what the compressed blocks before it produce
  refit   closed, then every factorized matrix refitted (lmshrink.refit) so its block's linears reproduce the
          original's outputs on the compressed inputs
  channels  the MLPs by nystrom (channel selection + refitted down projection), the attention linears by --method,
          both at the ratio with --allocation (each within its own part; the MLPs' --channel-allocation when given):
          a two-stage recipe, the same budget
  channels-closed / channels-open  the channels recipe block by block (nystrom needs --channel-allocation uniform
          there), closed or open loop
--joint: linears that read one input (q/k/v; gate/up) share one right factor (Plan.joint)
Every run is a child process; its result is merged into benchmarks/results/<name>.json by (variant, method, ratio,
calibration text, evaluation text), so runs made at different times land in one table. Perplexity: the evaluation
text's test split (WikiText-2 unless --data says otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

VARIANTS = {"whole": ("whole", None, False), "channels": ("channels", None, False), "open": ("sequential", "original", False),
            "closed": ("sequential", "compressed", False), "refit": ("sequential", "compressed", True),
            "open-refit": ("sequential", "original", True), "channels-closed": ("sequential", "compressed", False),
            "channels-open": ("sequential", "original", False)}


def _channel_stages(spec: dict, plan):
    """The channels recipe at the spec's ratio: nystrom on the MLPs, the spec's method on attention.

    With ``mlp_ratio``, the MLPs keep that share and attention what keeps the linears' total at the ratio
    (the same budget split differently between the parts).
    """
    from dataclasses import replace

    from lmshrink.recipes import Recipe

    mlp, attention = plan.ratio, plan.ratio
    if spec.get("mlp_ratio") is not None:
        mlp, attention = spec["mlp_ratio"], _attention_ratio(spec["model"], plan.ratio, spec["mlp_ratio"])
    return Recipe([replace(plan, method="nystrom", targets=("mlp",), options={}, ratio=mlp,
                           allocation=spec.get("channel_allocation") or plan.allocation),
                   replace(plan, targets=("attention",), ratio=attention)])


def _attention_ratio(model: str, ratio: float, mlp_ratio: float) -> float:
    """The attention ratio that, with the MLPs at ``mlp_ratio``, keeps ``ratio`` of the decoder linears' parameters."""
    import lmshrink
    from lmshrink.plan import select_targets

    sizes = {group: sum(t.shape[0] * t.shape[1] for t in select_targets(lmshrink.load_model(model).candidates(), (group,)))
             for group in ("mlp", "attention")}
    attention = (ratio * (sizes["mlp"] + sizes["attention"]) - mlp_ratio * sizes["mlp"]) / sizes["attention"]
    if not 0 < attention <= 1:
        raise SystemExit(f"--mlp-ratio {mlp_ratio}: attention would need ratio {attention:.3f}; allowed: a share that leaves it in (0, 1]")
    return attention


def child(spec: dict) -> dict:
    import torch

    import lmshrink
    from lmshrink.evaluate import corpus_perplexity

    torch.manual_seed(0)
    calib = lmshrink.load_corpus(spec["calib"])
    test = lmshrink.load_corpus(spec["data"])
    out = Path(spec["out"])
    path, calibrate_on, refit = VARIANTS[spec["variant"]] if spec["variant"] != "dense" else ("dense", None, False)
    start = time.perf_counter()
    plan = lmshrink.Plan(method=spec["method"], ratio=spec["ratio"], allocation=spec["allocation"], calibration_windows=spec["windows"],
                         window=spec["window"], joint=spec.get("joint", False), options=spec.get("options") or {},
                         self_share=spec.get("self_share")) if path != "dense" else None
    if path == "dense":
        loaded = lmshrink.load_model(spec["model"])
    elif path == "whole":
        loaded = lmshrink.load_model(spec["model"])
        lmshrink.compress(loaded, plan, data=calib, progress=False)
    elif path == "channels":
        from lmshrink.recipes import apply_recipe

        loaded = lmshrink.load_model(spec["model"])
        apply_recipe(loaded, _channel_stages(spec, plan), data=calib, progress=False)
    else:
        from lmshrink.sequential import compress_sequential

        extra = {"refit": True} if refit else {}  # only when asked: the plain variants also run on code without it
        plan = _channel_stages(spec, plan) if spec["variant"].startswith("channels") else plan
        compress_sequential(spec["model"], plan, calib, out, dtype="float32", device="cpu", calibrate_on=calibrate_on,
                            progress=False, **extra)
        loaded = lmshrink.load(out)
    seconds = time.perf_counter() - start
    ppl = corpus_perplexity(loaded, test, tokens=spec["tokens"], window=spec["window"], progress=False)
    return {"seconds": seconds, "perplexity": ppl["perplexity"], "eval_tokens": ppl["tokens"], "threads": torch.get_num_threads()}


def main() -> None:
    from _common import RESULTS, run_child, write_results

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratios", default="0.8")
    parser.add_argument("--variants", default="whole,closed,refit", help=f"Comma-separated: dense, {', '.join(VARIANTS)}.")
    parser.add_argument("--method", default="fwhiten")
    parser.add_argument("--allocation", default="sensitivity")
    parser.add_argument("--channel-allocation", default=None, choices=("uniform", "sensitivity"),
                        help="channels variant: the nystrom stage's allocation (default: --allocation).")
    parser.add_argument("--calib", default="wikitext-2", help="Calibration text (its train split where it has one).")
    parser.add_argument("--data", default="wikitext-2", help="Evaluation text (its test split).")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--joint", action="store_true", help="Plan.joint: linears of one input share one right factor.")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="A method option (Plan.options), e.g. whiten_damping=0.1; repeatable.")
    parser.add_argument("--mlp-ratio", type=float, default=None,
                        help="channels variants: the MLPs at this ratio, attention at what keeps the linears' total at --ratios.")
    parser.add_argument("--self-share", type=float, default=None,
                        help="Plan.self_share: that share of the calibration windows sampled from the model itself.")
    parser.add_argument("--name", default="closer")
    parser.add_argument("--replot", action="store_true", help="Only rewrite the table and the PNG from the JSON.")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))))
        return
    previous = RESULTS / f"{args.name}.json"
    runs = json.loads(previous.read_text())["runs"] if previous.exists() else []
    for run in runs:
        run.setdefault("joint", False)  # rows from before --joint
        run.setdefault("options", {})  # rows from before --option
    if args.replot:
        saved = json.loads(previous.read_text())
        _write(args.name, runs, write_results, {"command": saved["command"], "environment": saved["environment"]})
        return
    env = {**os.environ, "LMSHRINK_NO_STATS_CACHE": "1"}
    todo = [(variant, float(ratio)) for ratio in args.ratios.split(",") for variant in args.variants.split(",")]
    with tempfile.TemporaryDirectory(prefix="lmshrink-closer-") as scratch:
        for number, (variant, ratio) in enumerate(todo):
            spec = {"model": args.model, "variant": variant, "method": args.method, "ratio": ratio, "allocation": args.allocation,
                    "calib": args.calib, "data": args.data, "windows": args.windows, "window": args.window, "tokens": args.tokens,
                    "out": str(Path(scratch) / f"run{number}"), "joint": args.joint,
                    "options": {k: float(v) for k, v in (o.split("=", 1) for o in args.option)}}
            if args.self_share is not None and variant != "dense":
                spec["self_share"] = args.self_share
            if variant.startswith("channels") and args.mlp_ratio is not None:
                spec["mlp_ratio"] = args.mlp_ratio
            if variant.startswith("channels") and args.channel_allocation not in (None, args.allocation):
                spec["channel_allocation"] = args.channel_allocation
            if variant == "dense":
                spec.update(method=None, ratio=None, calib=args.data, joint=False)
            result = run_child([sys.executable, __file__, "--child", json.dumps(spec)], env)
            key = ("model", "variant", "method", "allocation", "ratio", "calib", "data", "windows", "tokens", "joint", "options",
                   "channel_allocation", "self_share", "mlp_ratio")
            if previous.exists():  # read again: another invocation may have added rows meanwhile
                runs = [{"joint": False, "options": {}, **r} for r in json.loads(previous.read_text())["runs"]]
            runs = [r for r in runs if any(r.get(k) != spec.get(k) for k in key)] + [{**spec, **result, "command": _command()}]
            _write(args.name, runs, write_results)
            print(variant, ratio, result, flush=True)


def _command() -> str:
    from _common import command_line

    return command_line()


def _write(name: str, runs: list[dict], write_results, kept: dict | None = None) -> None:
    """The table and the PNG; ``kept``: the command and environment to state (a replot keeps the last measuring run's)."""
    order = {v: i for i, v in enumerate(["dense", *VARIANTS])}
    runs = sorted(runs, key=lambda r: (r["model"], r["calib"], -(r["ratio"] or 2), order.get(r["variant"], 9)))
    dense = {(r["model"], r["data"], r["tokens"]): r.get("perplexity") for r in runs if r["variant"] == "dense" and r.get("perplexity")}
    rows = [[r["model"], r["variant"] + (" +joint" if r.get("joint") else "") +
             (f" (MLP channels {r['channel_allocation']})" if r.get("channel_allocation") else "") +
             (f" mlp_ratio={r['mlp_ratio']:g}" if r.get("mlp_ratio") is not None else "") +
             "".join(f" {k}={v:g}" for k, v in sorted((r.get("options") or {}).items())) +
             (f" self_share={r['self_share']:g}" if r.get("self_share") is not None else ""), r["method"] or "-", r["allocation"] if r["method"] else "-",
             r["ratio"], r["calib"], r["data"], r["windows"], r["tokens"], r.get("perplexity"),
             (r["perplexity"] / dense[r["model"], r["data"], r["tokens"]]) if r.get("perplexity") and (r["model"], r["data"], r["tokens"]) in dense else None,
             r.get("seconds"), r.get("threads"), r.get("error")] for r in runs]
    write_results(name, {"runs": runs, **(kept or {})},
                  ["model", "variant", "method", "allocation", "ratio", "calibration text", "evaluation text", "windows", "eval tokens", "perplexity (test split)", "x dense",
                   "wall s (compress, incl. load)", "threads", "error"], rows,
                  notes=["Each row's own command is in the JSON (rows from several invocations are merged).",
                         "Sensitivity: one global budget over the linears; uniform: every matrix at the ratio; window 512.",
                         "x dense: against the dense row of the same model, evaluation text and tokens.",
                         "X+self: half the calibration windows from X, half sampled by the model itself (--data X+self); self: all sampled.",
                         "refit-refactored: the refit as it was at commit a648ac0 (also the method run again on W Coc Ccc^-1, "
                         "both factors new); dropped after this row. The refit row is made by the same left-factor refit as now.",
                         "Calibration windows come from the calibration text's train split (standard-library source has none).",
                         "Wall times: 2 shared CPU cores, OMP_WAIT_POLICY=PASSIVE; compare within similar load only.",
                         f"{name}.png: x dense against the ratio, rows of the reference setup (64 windows, 16k tokens of WikiText-2)."])
    _plot(name, runs, dense)


def _plot(name: str, runs: list[dict], dense: dict) -> None:
    """x dense against the ratio, one line per (model, variant, method, allocation, calibration text)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from _common import RESULTS

    lines: dict[str, list[tuple[float, float]]] = {}
    for r in runs:
        if r["variant"] == "dense" or not r.get("perplexity") or r["windows"] != 64 or r["data"] != "wikitext-2" \
                or (r["model"], r["data"], r["tokens"]) not in dense:
            continue
        options = "".join(f" {k}={v:g}" for k, v in sorted((r.get("options") or {}).items())) + \
            (f" mlp_ratio={r['mlp_ratio']:g}" if r.get("mlp_ratio") is not None else "") + \
            (f" self_share={r['self_share']:g}" if r.get("self_share") is not None else "")
        channel = f" (MLP channels {r['channel_allocation']})" if r.get("channel_allocation") else ""
        label = (f"{r['model']} {r['variant']}{channel}{' +joint' if r.get('joint') else ''}{options} {r['method']} {r['allocation']}, "
                 f"calibrated on {r['calib']}")
        lines.setdefault(label, []).append((r["ratio"], r["perplexity"] / dense[r["model"], r["data"], r["tokens"]]))
    if not lines:
        return
    figure, axis = plt.subplots(figsize=(8, 5))
    for label, points in sorted(lines.items()):
        points.sort()
        axis.plot([x for x, _ in points], [y for _, y in points], marker="o", label=label)
    axis.axhline(1.0, color="black", linewidth=0.8)
    axis.plot([0.6, 0.8], [2.0, 1.2], "kx", markersize=9, linestyle="none", label="issue 15's goals without training")
    axis.set_yscale("log")
    axis.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axis.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    axis.set_xlabel("ratio (parameters kept in the compressed linears)")
    axis.set_ylabel("perplexity / dense (WikiText-2 test, first 16k tokens)")
    axis.legend(fontsize=7)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(RESULTS / f"{name}.png", dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
