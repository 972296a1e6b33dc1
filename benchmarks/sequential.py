"""Block-by-block vs whole-model compression (issue 13) on a real model: perplexity, peak RSS, wall time, bytes on disk.

    python benchmarks/sequential.py [--model smollm2-135m] [--ratio 0.8] [--methods svd,fwhiten] [--tokens 8192]

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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def child(spec: dict) -> dict:
    import torch

    import lmshrink
    from lmshrink.evaluate import corpus_perplexity

    torch.manual_seed(0)
    corpus = lmshrink.load_corpus(spec["data"])
    start = time.perf_counter()
    out = Path(spec["out"])
    plan = lmshrink.Plan(method=spec["method"], ratio=spec["ratio"], calibration_windows=spec["windows"], window=spec["window"]) \
        if spec["method"] else None
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
    from _common import write_results

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratio", type=float, default=0.8)
    parser.add_argument("--methods", default="fwhiten,svd")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--data", default="wikitext-2")
    parser.add_argument("--name", default="sequential")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))))
        return
    runs = []  # the most informative first: results are written after every run
    for method in args.methods.split(","):
        runs += [("whole", method, "float32", None), ("sequential", method, "float32", "original")]
        if method != "svd":  # data-free: closed and open loop are the same computation
            runs.append(("sequential", method, "float32", "compressed"))
    runs += [("sequential", method, "auto", "compressed") for method in args.methods.split(",")] + [("dense", None, None, None)]
    rows, results = [], []
    env = {**os.environ, "LMSHRINK_NO_STATS_CACHE": "1"}
    with tempfile.TemporaryDirectory(prefix="lmshrink-sequential-") as scratch:
        for number, (path, method, dtype, calibrate_on) in enumerate(runs):
            spec = {"model": args.model, "path": path, "method": method, "dtype": dtype, "calibrate_on": calibrate_on,
                    "ratio": args.ratio, "windows": args.windows, "window": args.window, "tokens": args.tokens, "data": args.data,
                    "out": str(Path(scratch) / f"run{number}")}
            done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, env=env)
            line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                result = {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
            else:
                result = json.loads(line[len("RESULT "):])
            results.append({**spec, **result})
            label = "dense (float32)" if path == "dense" else (f"{method} whole-model float32" if path == "whole" else
                                                               f"{method} block-by-block {dtype}, {'closed' if calibrate_on == 'compressed' else 'open'} loop")
            rows.append([label, result.get("perplexity"), result.get("peak_rss_mib"), result.get("seconds"),
                         result.get("weights_bytes_on_disk"), result.get("error")])
            write_results(args.name, {"model": args.model, "ratio": args.ratio, "runs": results},
                          ["run", f"perplexity ({args.tokens} tokens, window {args.window})", "peak RSS MiB (compress + save)",
                           "wall s (compress + save)", "weights bytes on disk", "error"], rows,
                          notes=[f"{args.windows} calibration windows of {args.window} tokens from WikiText-2 train; statistics cache off.",
                                 "Peak RSS: ru_maxrss of the child process at the end of compression and saving (before evaluation).",
                                 "Block-by-block outputs are evaluated in float32 (the bf16 run's weights are exactly its bf16 values).",
                                 "Closed loop: each block is calibrated on the outputs of the already-compressed blocks; the Fisher "
                                 "(fwhiten) is always the original model's (exact, block-wise backward).",
                                 "2 shared CPU cores: wall times are noisy."])
            print(rows[-1], flush=True)


if __name__ == "__main__":
    main()
