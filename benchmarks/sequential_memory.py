"""Where block-by-block compression's peak RSS comes from (issue 13): resident memory by phase, heap trimmed or not.

    python benchmarks/sequential_memory.py [--model smollm2-135m] [--windows 16] [--blocks 2] [--trim off,on,mmap]

Each run is a child process: ``compress_sequential`` (fwhiten, sensitivity, ratio 0.8, float32, closed loop) while a
thread reads VmRSS / RssAnon / RssFile from /proc every 0.2 s and files each reading under the phase running then
(opening the model, calibration capture, the exact-Fisher pass, the sensitivity spectra pass, then each block). The
run stops after ``--blocks`` blocks: the phases before the blocks are where the peak is. ``trim off`` replaces
``lmshrink.shards.return_freed_memory`` (glibc's malloc_trim after every released block) by nothing, as before it.
Writes benchmarks/results/sequential_memory.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


class _Stop(Exception):
    pass


def child(spec: dict) -> dict:
    import torch

    import lmshrink
    import lmshrink.sequential as sequential
    import lmshrink.shards as shards

    torch.set_num_threads(1)
    if not spec["trim"]:
        shards._malloc_trim = lambda: None  # return_freed_memory looks it up at each call
    phase, peaks = ["start"], {}

    def sample():
        while True:
            with open("/proc/self/status") as status:
                found = {line.split(":")[0]: int(line.split()[1]) // 1024 for line in status
                         if line.startswith(("VmRSS", "RssAnon", "RssFile"))}
            peak = peaks.setdefault(phase[0], {"rss": 0, "anon": 0, "file": 0})
            for key, name in (("rss", "VmRSS"), ("anon", "RssAnon"), ("file", "RssFile")):
                peak[key] = max(peak[key], found[name])
            time.sleep(0.2)

    def labelled(function, label):
        def run(*args, **kwargs):
            phase[0] = label
            return function(*args, **kwargs)
        return run

    sequential.Engine.calibrate = labelled(sequential.Engine.calibrate, "calibration capture")
    sequential.exact_fisher = labelled(sequential.exact_fisher, "exact Fisher (forward, backward)")
    sequential._sensitivity_ranks = labelled(sequential._sensitivity_ranks, "sensitivity spectra")
    compress_block = sequential._compress_block_stage

    def block(engine, index, *args, **kwargs):
        if index >= spec["blocks"]:
            raise _Stop
        phase[0] = f"block {index}"
        return compress_block(engine, index, *args, **kwargs)

    sequential._compress_block_stage = block
    threading.Thread(target=sample, daemon=True).start()
    phase[0] = "opening the model"
    plan = lmshrink.Plan(method="fwhiten", ratio=0.8, allocation="sensitivity", calibration_windows=spec["windows"], window=512)
    try:
        sequential.compress_sequential(spec["model"], plan, lmshrink.load_corpus(spec["data"]), spec["out"], dtype="float32",
                                       device="cpu", progress=False, overwrite=True)
    except _Stop:
        pass
    time.sleep(0.5)
    with open("/proc/self/status") as status:
        hwm = next(int(line.split()[1]) // 1024 for line in status if line.startswith("VmHWM"))
    return {"peak_rss_mib": hwm, "phases": peaks}


def main() -> None:
    import tempfile

    from _common import run_child, write_results

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="wikitext-2")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--trim", default="off,on", help="off, on, mmap (on, and glibc's mmap threshold fixed at 128 KiB)")
    parser.add_argument("--name", default="sequential_memory", help="results/<name>.json and .md")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))))
        return
    runs, rows = [], []
    env = {**os.environ, "LMSHRINK_NO_STATS_CACHE": "1", "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory(prefix="lmshrink-memory-") as scratch:
        for trim in args.trim.split(","):
            spec = {"model": args.model, "data": args.data, "windows": args.windows, "blocks": args.blocks, "trim": trim != "off",
                    "out": str(Path(scratch) / f"out-{trim}")}
            # mmap: glibc's mmap threshold fixed at its default 128 KiB, so it never rises and every larger block is
            # its own mapping, unmapped when freed (set before the process starts, as glibc reads it then)
            result = run_child([sys.executable, __file__, "--child", json.dumps(spec)],
                               {**env, **({"MALLOC_MMAP_THRESHOLD_": "131072"} if trim == "mmap" else {})})
            runs.append({**spec, **result})
            for name, peak in result.get("phases", {}).items():
                rows.append([f"trim {trim}", name, peak["rss"], peak["anon"], peak["file"]])
            rows.append([f"trim {trim}", "peak (VmHWM)", result.get("peak_rss_mib"), None, result.get("error")])
            print(rows[-1], flush=True)
    write_results(args.name, {"model": args.model, "windows": args.windows, "runs": runs},
                  ["run", "phase", "peak RSS MiB", "of it anonymous", "of it file-backed"], rows,
                  notes=[f"{args.model}, fwhiten + sensitivity at 0.8, block by block in float32 (closed loop), {args.windows} "
                         f"calibration windows of 512 from {args.data}; stopped after {args.blocks} blocks; 1 thread.",
                         "Readings every 0.2 s from /proc/self/status, filed under the phase running then; VmHWM: the "
                         "process's own peak.",
                         "trim on: glibc's malloc_trim after every released block (lmshrink.shards.return_freed_memory); off: as before; "
                         "mmap: on, and MALLOC_MMAP_THRESHOLD_=131072 (glibc's default threshold, kept from rising)."])


if __name__ == "__main__":
    main()
