"""Block-by-block vs whole-model compression (issue 13) on a real model: perplexity, peak RSS, wall time, bytes on disk.

    python benchmarks/sequential.py [--model smollm2-135m] [--ratios 0.6,0.8] [--methods fwhiten] [--allocation sensitivity]

Each run is a child process (so ru_maxrss is that run's own peak), taken at the end of compression + save,
before the evaluation loads the result. Runs: the dense model; per method the whole-model path
(lmshrink.compress + lmshrink.save, float32) and the block-by-block engine in float32 (open loop and, for
calibrated methods, closed loop) and in the checkpoint's own dtype (auto: bfloat16 for a GGUF, closed loop).
The statistics cache is off, so every run measures its own calibration. Results are written after every run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, command_line, run_child, write_results  # noqa: E402


def child(spec: dict) -> dict:
    import torch

    import lmshrink
    from lmshrink.evaluate import corpus_perplexity

    torch.manual_seed(0)
    corpus = lmshrink.load_corpus(spec["data"])
    start = time.perf_counter()
    out = Path(spec["out"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    plan = lmshrink.Plan(method=spec["method"], ratio=spec["ratio"], allocation=spec["allocation"], calibration_windows=spec["windows"],
                         window=spec["window"]) if spec["method"] else None
    if spec["path"] == "dense":
        loaded = lmshrink.load_model(spec["model"])
    elif spec["path"] == "whole":
        loaded = lmshrink.load_model(spec["model"])
        lmshrink.compress(loaded, plan, data=corpus, progress=False)
        lmshrink.save(loaded, out)
    else:
        from lmshrink.sequential import compress_sequential

        compress_sequential(spec["model"], plan, corpus, out, dtype=spec["dtype"], device="cpu", calibrate_on=spec["calibrate_on"],
                            progress=False)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    disk = sum(f.stat().st_size for f in out.rglob("*.safetensors")) if out.exists() else None
    if spec["path"] == "sequential":
        loaded = lmshrink.load(out)
        loaded.model.float()  # evaluated in float32 like the others (bf16 weights, exactly)
    ppl = corpus_perplexity(loaded, corpus, tokens=spec["tokens"], window=spec["window"], progress=False)
    return {"seconds": seconds, "peak_rss_mib": peak, "weights_bytes_on_disk": disk, "perplexity": ppl["perplexity"],
            "eval_tokens": ppl["tokens"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratios", default="0.6,0.8", help="Comma-separated; the first is run first.")
    parser.add_argument("--methods", default="fwhiten")
    parser.add_argument("--allocation", default="sensitivity")
    parser.add_argument("--paths", default="closed,open,whole,bf16", help="Which runs per ratio (closed, open, whole, bf16).")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--data", default="wikitext-2")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in each child (default: torch's choice).")
    parser.add_argument("--name", default="sequential")
    parser.add_argument("--no-dense", action="store_true", help="Skip the dense row (one per model is enough).")
    parser.add_argument("--replot", action="store_true", help="Only rewrite the table and the PNG from the JSON.")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))))
        return
    kinds = {"closed": ("sequential", "float32", "compressed"), "open": ("sequential", "float32", "original"),
             "whole": ("whole", "float32", None), "bf16": ("sequential", "auto", "compressed")}
    runs = [(*kinds[kind], method, float(ratio)) for ratio in args.ratios.split(",") for method in args.methods.split(",")
            for kind in args.paths.split(",")]
    if not args.no_dense:
        runs.append(("dense", None, None, None, None))
    if args.replot:
        saved = json.loads((RESULTS / f"{args.name}.json").read_text())
        _write(args, _previous(args.name), {"command": saved["command"], "environment": saved["environment"]})
        return
    env = {**os.environ, "LMSHRINK_NO_STATS_CACHE": "1"}
    with tempfile.TemporaryDirectory(prefix="lmshrink-sequential-") as scratch:
        for number, (path, dtype, calibrate_on, method, ratio) in enumerate(runs):
            spec = {"model": args.model, "path": path, "method": method, "dtype": dtype, "calibrate_on": calibrate_on,
                    "ratio": ratio, "allocation": args.allocation, "windows": args.windows, "window": args.window,
                    "tokens": args.tokens, "data": args.data, "threads": args.threads, "out": str(Path(scratch) / f"run{number}")}
            result = run_child([sys.executable, __file__, "--child", json.dumps(spec)], env)
            done = {**spec, **result, "label": _label(path, dtype, calibrate_on), "command": command_line()}
            # Rows of earlier invocations under the same name stay, unless this run measured the same thing again.
            key = ("model", "path", "method", "dtype", "calibrate_on", "ratio", "allocation", "windows", "window", "tokens", "data")
            results = [r for r in _previous(args.name) if any(r.get(k) != spec[k] for k in key)] + [done]
            _write(args, results)
            print(done, flush=True)


def _previous(name: str) -> list[dict]:
    path = RESULTS / f"{name}.json"
    if not path.exists():
        return []
    saved = json.loads(path.read_text())
    return [{"command": saved["command"], **run} for run in saved["runs"]]  # rows from before per-row commands


def _write(args, results: list[dict], kept: dict | None = None) -> None:
    """The table and the PNG; ``kept``: the command and environment to state (a replot keeps the measuring run's)."""
    order = {"dense": 0, "whole": 1, "sequential": 2}
    results = sorted(results, key=lambda r: (r["model"], -(r["ratio"] or 2), order[r["path"]], r["calibrate_on"] or "", r["dtype"] or ""))
    rows = [[r["label"], r["method"] or "-", r["ratio"], r.get("perplexity"), r.get("peak_rss_mib"), r.get("seconds"),
             r.get("weights_bytes_on_disk"), r.get("error")] for r in results]
    write_results(args.name, {"model": args.model, "allocation": args.allocation, "runs": results, **(kept or {})},
                  ["run", "method", "ratio", f"perplexity ({args.tokens} tokens, window {args.window})",
                   "peak RSS MiB (load + compress + save)", "wall s (load + compress + save)", "weights bytes on disk", "error"],
                  rows,
                  notes=[f"{args.windows} calibration windows of {args.window} tokens from {args.data} train; "
                         f"allocation {args.allocation}; statistics cache off.",
                         "Rows of several invocations are merged; each row's own command is in the JSON.",
                         "Peak RSS: ru_maxrss of the child process at the end of compression and saving (before evaluation).",
                         "Block-by-block outputs are evaluated in float32 (the bf16 run's weights are exactly its bf16 values).",
                         "Closed loop: each block is calibrated on the outputs of the already-compressed blocks; open loop: on the "
                         "original model's activations (what the whole-model path sees). The Fisher (fwhiten) is always the "
                         "original model's (exact, block-wise backward).",
                         "2 shared CPU cores: wall times are noisy; compare within one run only."])
    _plot(args.name, results)


def _label(path, dtype, calibrate_on) -> str:
    if path == "dense":
        return "dense (float32)"
    if path == "whole":
        return "whole-model float32"
    return f"block-by-block {'bf16' if dtype == 'auto' else dtype}, {'closed' if calibrate_on == 'compressed' else 'open'} loop"


def _plot(name: str, results: list[dict]) -> None:
    """Perplexity against ratio per path, and peak RSS per path (two panels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in results if r.get("perplexity") is not None]
    if not done:
        return
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for label in dict.fromkeys(r["label"] for r in done if r["path"] != "dense"):
        points = sorted((r["ratio"], r["perplexity"]) for r in done if r["label"] == label)
        left.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    for r in done:
        if r["path"] == "dense":
            left.axhline(r["perplexity"], color="black", linestyle=":", label="dense")
    left.set_xlabel("ratio (parameters kept per matrix)")
    left.set_ylabel("perplexity")
    left.legend(fontsize=8)
    labels = [f"{r['label']}\n{'' if r['ratio'] is None else r['ratio']}" for r in done if r.get("peak_rss_mib")]
    right.barh(labels, [r["peak_rss_mib"] for r in done if r.get("peak_rss_mib")])
    right.set_xlabel("peak RSS MiB")
    right.tick_params(axis="y", labelsize=7)
    figure.tight_layout()
    figure.savefig(RESULTS / f"{name}.png", dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
