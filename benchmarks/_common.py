"""Helpers shared by the benchmark scripts: environment facts, peak memory, JSON + markdown output."""

from __future__ import annotations

import json
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> dict:
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads(), "machine": platform.machine(), "processor": platform.processor() or None}


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def best_seconds(run, repeats: int) -> float:
    """The fastest of ``repeats`` calls of ``run()``, in seconds (the least disturbed by other jobs on the machine)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def run_child(command: list[str], env: dict | None = None) -> dict:
    """Run one measurement in its own process (its own peak RSS, nothing shared): the JSON it prints after "RESULT "
    on stdout (the last such line), else {"error": the last line of its stderr}."""
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT "):]) if lines else {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}


def write_results(name: str, payload: dict, table_header: list[str], table_rows: list[list], notes: list[str] = ()) -> None:
    """benchmarks/results/<name>.json and <name>.md (command first, then the table, then notes)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"command": command_line(), "environment": environment(), **payload}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [f"# {name}", "", f"Command: `{payload['command']}`", "",
             "| " + " | ".join(table_header) + " |", "|" + "---|" * len(table_header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in table_rows]
    lines += [""] + [f"- {note}" for note in notes]
    env = payload["environment"]
    lines += ["", f"Environment: Python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, "
              f"{env['threads']} threads, {env['machine']}."]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3g}"
    return str(value)
