"""Where block-by-block compression's peak RSS comes from (issue 13): resident memory by phase, heap trimmed or not.

    python benchmarks/sequential_memory.py [--model smollm2-135m] [--windows 16] [--blocks 2] [--trim off,on,mmap]

Each run is a child process: ``compress_sequential`` (fwhiten, sensitivity, ratio 0.8, float32, closed loop) while a
thread reads VmRSS / RssAnon / RssFile from /proc every 0.2 s and files each reading under the phase running then
(opening the model, calibration capture, the exact-Fisher pass, the sensitivity spectra pass, then each block). The
run stops after ``--blocks`` blocks: the phases before the blocks are where the peak is. ``--trim``: ``off`` replaces
``lmshrink.shards.return_freed_memory`` (glibc's malloc_trim after every released block and calibration window) by
nothing; ``on`` runs as lmshrink does; ``mmap`` also holds glibc's mmap threshold at 128 KiB (MALLOC_MMAP_THRESHOLD_).
Wall seconds per phase give the speed cost.
Writes benchmarks/results/<name>.json and .md.
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
    if spec["trim"] == "off":
        shards._malloc_trim = lambda: None  # return_freed_memory looks it up at each call
    phase, peaks, seconds = ["start"], {}, {}
    clock = [time.perf_counter()]

    def enter(label):
        now = time.perf_counter()
        seconds[phase[0]] = seconds.get(phase[0], 0.0) + now - clock[0]
        phase[0], clock[0] = label, now

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
            enter(label)
            return function(*args, **kwargs)
        return run

    sequential.Engine.calibrate = labelled(sequential.Engine.calibrate, "calibration capture")
    sequential.exact_fisher = labelled(sequential.exact_fisher, "exact Fisher (forward, backward)")
    sequential._sensitivity_ranks = labelled(sequential._sensitivity_ranks, "sensitivity spectra")
    compress_block = sequential._compress_block_stage

    def block(engine, index, *args, **kwargs):
        if index >= spec["blocks"]:
            raise _Stop
        enter(f"block {index}")
        return compress_block(engine, index, *args, **kwargs)

    sequential._compress_block_stage = block
    threading.Thread(target=sample, daemon=True).start()
    enter("opening the model")
    plan = lmshrink.Plan(method="fwhiten", ratio=0.8, allocation="sensitivity", calibration_windows=spec["windows"], window=512)
    try:
        sequential.compress_sequential(spec["model"], plan, lmshrink.load_corpus(spec["data"]), spec["out"], dtype="float32",
                                       device="cpu", progress=False, overwrite=True)
    except _Stop:
        pass
    enter("stopped")
    time.sleep(0.5)
    with open("/proc/self/status") as status:
        hwm = next(int(line.split()[1]) // 1024 for line in status if line.startswith("VmHWM"))
    return {"peak_rss_mib": hwm, "phases": peaks, "seconds": seconds}


def main() -> None:
    import tempfile

    from _common import run_child, write_results

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="wikitext-2")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--trim", default="off,on", help="off, on (as lmshrink runs), mmap (on, and glibc's mmap threshold held at 128 KiB)")
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
            spec = {"model": args.model, "data": args.data, "windows": args.windows, "blocks": args.blocks, "trim": trim,
                    "out": str(Path(scratch) / f"out-{trim}")}
            # mmap: glibc's mmap threshold held at its default 128 KiB, so it never rises and every larger block is its
            # own mapping, unmapped when freed (read when the process starts)
            result = run_child([sys.executable, __file__, "--child", json.dumps(spec)],
                               {**env, **({"MALLOC_MMAP_THRESHOLD_": "131072"} if trim == "mmap" else {})})
            runs.append({**spec, **result})
            seconds = result.get("seconds", {})
            for name, peak in result.get("phases", {}).items():
                rows.append([f"trim {trim}", name, peak["rss"], peak["anon"], peak["file"], round(seconds.get(name, 0.0), 1)])
            rows.append([f"trim {trim}", "peak (VmHWM); all phases", result.get("peak_rss_mib"), None, result.get("error"),
                         round(sum(seconds.values()), 1) if seconds else None])
            print(rows[-1], flush=True)
    write_results(args.name, {"model": args.model, "windows": args.windows, "runs": runs},
                  ["run", "phase", "peak RSS MiB", "of it anonymous", "of it file-backed", "seconds"], rows,
                  notes=[f"{args.model}, fwhiten + sensitivity at 0.8, block by block in float32 (closed loop), {args.windows} "
                         f"calibration windows of 512 from {args.data}; stopped after {args.blocks} blocks; 1 thread.",
                         "Readings every 0.2 s from /proc/self/status, filed under the phase running then; VmHWM: the "
                         "process's own peak.",
                         "trim off: no malloc_trim; on: as lmshrink runs (lmshrink.shards.return_freed_memory: glibc's "
                         "malloc_trim after every released block and, since stop 38, every calibration window); mmap: on, "
                         "and MALLOC_MMAP_THRESHOLD_=131072 (glibc's default threshold, kept from rising).",
                         "seconds: wall time in each phase, one thread, the runs one after another (another job may run "
                         "beside: compare within a run)."])


if __name__ == "__main__":
    main()
