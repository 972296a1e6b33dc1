"""Greedy samples of the default job's candidates: the original SmolLM2-135M, fwhiten (ratio 0.8, sensitivity, 32
calibration windows of WikiText-2) and saved directories (e.g. made by `lmshrink compress --recipe channels`).

    python benchmarks/default_job_samples.py NAME=DIR [NAME=DIR ...]

24 prompts (3 fixed, 21 from the first long WikiText-2 test paragraphs, 12 words each), 24 new tokens each, greedy.
Per model: the mean share of distinct tokens and how many generations repeat one token 4 or more times in a row.
Writes results/default_job_samples.json and .md.
"""

import itertools
import json
import sys
from pathlib import Path

import torch

import lmshrink

RESULTS = Path(__file__).resolve().parent / "results"


def main(saved: list[str]) -> None:
    torch.set_num_threads(1)
    corpus = lmshrink.load_corpus("wikitext-2")
    lines = [l.strip() for l in corpus.test.splitlines() if len(l.strip()) > 200 and not l.strip().startswith("=")]
    prompts = ["The capital of France is", "Once upon a time", "def fibonacci(n):"] + [" ".join(l.split()[:12]) for l in lines[:21]]
    models = {"original": lmshrink.load_model("smollm2-135m"), **{pair.split("=", 1)[0]: lmshrink.load(pair.split("=", 1)[1]) for pair in saved}}
    fwhiten = lmshrink.load_model("smollm2-135m")
    lmshrink.compress(fwhiten, lmshrink.Plan(method="fwhiten", ratio=0.8, allocation="sensitivity"), data=corpus, progress=False)
    models["fwhiten"] = fwhiten
    out, table = {}, []
    for name, model in models.items():
        rows = []
        for prompt in prompts:
            ids = model.tokenizer(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                new = model.model.generate(ids, max_new_tokens=24, do_sample=False)[0][ids.shape[1]:].tolist()
            run = max(len(list(group)) for _, group in itertools.groupby(new))
            rows.append({"prompt": prompt, "text": model.tokenizer.decode(new), "distinct": len(set(new)) / len(new), "longest_run": run})
        out[name] = rows
        table.append(f"| {name} | {sum(r['distinct'] for r in rows) / len(rows):.3f} | {sum(r['longest_run'] >= 4 for r in rows)} of {len(rows)} |")
    (RESULTS / "default_job_samples.json").write_text(json.dumps(out, indent=1) + "\n")
    (RESULTS / "default_job_samples.md").write_text(
        "# Greedy samples of the default job's candidates\n\nCommand: `python benchmarks/default_job_samples.py "
        + " ".join(saved) + "` (the directories made by `lmshrink compress --recipe channels`: see below)\n\n"
        "| model | mean distinct-token share | generations with a token repeated >= 4 times in a row |\n|---|---|---|\n"
        + "\n".join(table) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
