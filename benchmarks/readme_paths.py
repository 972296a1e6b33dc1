"""Every README path on one model, with reduced settings: does it run, and what does it say (issue 13: "everything in
the README that works on SmolLM2 works on Gemma-3-270M too, or says why not").

    python benchmarks/readme_paths.py --model gemma3-270m [--data wikitext-2] [--tokens 2048] [--windows 4]

Each step is the command a user would type (`python -m lmshrink ...`, or a few lines of Python for the transformers,
export and lm-eval paths), run in a fresh process; the table records whether it succeeded, its wall time and its key
figure (perplexity, bytes, the largest logit difference against lmshrink.load, ...), or the first error line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Logits of lmshrink.load(DIR) against another way of loading the same directory (argv: dir, way).
COMPARE = r"""
import json, sys, torch, lmshrink
from transformers import AutoModelForCausalLM
directory, way = sys.argv[1], sys.argv[2]
ours = lmshrink.load(directory)
ids = torch.tensor([ours.encode("The capital of France is Paris, and the capital of Italy is")])
other = AutoModelForCausalLM.from_pretrained(sys.argv[3] if way == "export" else directory, dtype=torch.float32)
with torch.no_grad():
    a, b = ours.logits(ids).float(), other(input_ids=ids).logits.float()
print("RESULT " + json.dumps({"max_abs_logit_diff": float((a - b).abs().max()), "logit_scale": float(a.abs().max())}))
"""


def run(command: list[str], cwd: Path, timeout: int = 3600) -> tuple[bool, float, str, str]:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env={**os.environ, "LMSHRINK_NO_STATS_CACHE": "1", "TOKENIZERS_PARALLELISM": "false"})
    seconds = time.perf_counter() - started
    error = next((line for line in reversed(done.stderr.splitlines()) if line.startswith("error:")), None)
    if done.returncode != 0 and error is None:
        error = (done.stderr.strip().splitlines() or ["exit status %d" % done.returncode])[-1]
    return done.returncode == 0, seconds, done.stdout, error or ""


def main() -> None:
    from _common import write_results

    from lmshrink.lm_eval_model import write_choice_task

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--data", default=None, help="Text for calibration and perplexity (default: lmshrink's default).")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    cli = [sys.executable, "-m", "lmshrink"]
    data = ["--data", args.data] if args.data else []
    small = [*data, "--tokens", str(args.tokens), "--calibration-windows", str(args.windows)]
    rows, results = [], {}
    with tempfile.TemporaryDirectory(prefix="lmshrink-readme-") as scratch:
        work = Path(scratch)
        tasks = work / "tasks"
        write_choice_task(tasks, "readme_mc", [{"question": f"Which word names a colour, item {i}?",
                                                "choices": ["table", "green", "river"], "answer": 1} for i in range(20)])
        steps = [
            ("inspect MODEL", [*cli, "inspect", args.model, "--json"], None),
            ("compress --method svd (data-free)", [*cli, "compress", args.model, "--method", "svd", "--ratio", "0.8",
                                                   "--targets", "linears", *small, "--out", "svd", "--json"], "perplexity"),
            ("compress --method fwhiten --allocation sensitivity", [*cli, "compress", args.model, "--method", "fwhiten", "--ratio", "0.8",
                                                                    "--allocation", "sensitivity", *small, "--out", "fw", "--json"], "perplexity"),
            ("compress --sequential --method fwhiten", [*cli, "compress", args.model, "--sequential", "--method", "fwhiten", "--ratio",
                                                        "0.8", *small, "--out", "seq", "--json"], "perplexity"),
            ("compress --refit (block engine, whole-model run)", [*cli, "compress", args.model, "--refit", "--method", "svdllm",
                                                                  "--ratio", "0.8", *small, "--out", "refit", "--json"], "perplexity"),
            ("compress --recipe half", [*cli, "compress", args.model, "--recipe", "half", *small, "--out", "half", "--json"], "perplexity"),
            ("compress --bits 4 --quant-group 64", [*cli, "compress", args.model, "--method", "svd", "--ratio", "0.5", "--bits", "4",
                                                    "--quant-group", "64", *small, "--out", "q4", "--json"], "perplexity"),
            ("eval DIR", [*cli, "eval", "fw", *data, "--tokens", str(args.tokens), "--json"], "eval"),
            ("eval DIR --tasks (local lm-eval task)", [*cli, "eval", "fw", *data, "--tokens", str(args.tokens), "--tasks", "readme_mc",
                                                       "--include-path", str(tasks), "--json"], "tasks"),
            ("generate DIR --reference MODEL", [*cli, "generate", "fw", "--prompt", "The capital of France is", "--max-new-tokens", "12",
                                                "--reference", args.model], "text"),
            ("AutoModelForCausalLM.from_pretrained(DIR) after import lmshrink", [sys.executable, "-c", COMPARE, "fw", "auto", ""], "logits"),
            ("export --dense, then plain transformers", [*cli, "export", "fw", "--dense", "--out", "fw-dense"], None),
            ("plain transformers on the export", [sys.executable, "-c", COMPARE, "fw", "export", "fw-dense"], "logits"),
        ]
        for label, command, kind in steps:
            ok, seconds, stdout, error = run(command, work)
            figure = ""
            if ok and kind in ("perplexity", "eval", "tasks"):
                result = json.loads(stdout)
                if kind == "perplexity":
                    before = result["perplexity"]["before"]
                    figure = (f"perplexity {'-' if before is None else f'{before:.2f}'} -> {result['perplexity']['after']:.2f}; "
                              f"params {result['params']['before']:,} -> {result['params']['after']:,}")
                elif kind == "eval":
                    figure = f"perplexity {result['perplexity']:.2f}"
                else:
                    figure = "; ".join(f"{task}: acc {row.get('acc')}" for task, row in result["tasks"].items())
                results[label] = {k: result.get(k) for k in ("perplexity", "params", "tasks")}
            elif ok and kind == "logits":
                line = next(l for l in stdout.splitlines() if l.startswith("RESULT "))
                diff = json.loads(line[len("RESULT "):])
                figure = f"max abs logit difference {diff['max_abs_logit_diff']:.2e} (logits up to {diff['logit_scale']:.1f})"
                results[label] = diff
            elif ok and kind == "text":
                figure = " / ".join(line.strip() for line in stdout.strip().splitlines()[:4])[:300]
            rows.append([label, "ok" if ok else "FAILED", seconds, figure or "-", error or "-"])
            print(rows[-1], flush=True)
    write_results(args.name or f"readme_paths_{args.model}", {"model": args.model, "rows": rows, "results": results},
                  ["README path", "result", "wall s", "what it said", "error"], rows,
                  notes=[f"Model {args.model}; {args.tokens} evaluation tokens, {args.windows} calibration windows, ratio 0.8 unless "
                         "the path says otherwise: reduced settings, a check that each path runs and says sensible things, "
                         "not a quality benchmark.",
                         "Logit differences: lmshrink.load(DIR) against transformers loading the same directory (after "
                         "`import lmshrink`) or the dense export (plain transformers), on one short sentence."])


if __name__ == "__main__":
    main()
