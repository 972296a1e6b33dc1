"""Low-rank LSTM language models (Winata et al. 2019): perplexity vs rank, fine-tuning, speed, norms.

    python benchmarks/lstm.py [--models ptb-small,ptb-medium,wt2-small] [--parts speed,quality,finetune,norms]
                              [--ranks auto | 20,40,80] [--eval-tokens 20000] [--finetune-steps 60]
                              [--speed-hidden 200,400,650]

Ranks default to hidden/10, hidden/5 and 2 hidden/5 of each model (20, 40, 80 for a 2x200 LSTM), so models
of different widths are compared at the same relative rank.

Writes benchmarks/results/lstm.json, lstm.md and PNG plots. Reference models come from
lmshrink.models.lstm.reference_model (trained and cached on first use). Speed is measured on one thread
as the median of repeated runs; the two cores are shared with other jobs, so absolute numbers are noisy
and ratios measured back to back are what counts.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import lmshrink
from lmshrink.analysis.norms import correlate, model_norms
from lmshrink.layers.lstm import FactorizedLSTM
from lmshrink.models import FAMILIES, LoadedModel
from lmshrink.models.lstm import RNNModel, evaluate_lm, finetune_lm, reference_corpus, reference_model

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {"W_i": ("W_i",), "W_h": ("W_h",), "both": ("W_i", "W_h")}
METHODS = ("svd", "seminmf", "prune")


def _median_seconds(function, repeats: int) -> float:
    function()  # warm-up (TorchScript compiles on first call)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _compress(loaded: LoadedModel, method: str, targets: tuple[str, ...], rank: int) -> LoadedModel:
    model = LoadedModel(copy.deepcopy(loaded.model), loaded.family, loaded.tokenizer, loaded.source)
    options = {"seminmf_iterations": 300} if method == "seminmf" else {}
    lmshrink.compress(model, lmshrink.Plan(method=method, targets=targets, rank=rank, options=options), progress=False)
    return model


def _paired(reference, candidate, repeats: int) -> tuple[float, float, float]:
    """(reference seconds, candidate seconds, median of per-pair speed ratios), runs interleaved.

    Seconds are CPU seconds of this process (time.process_time) on one thread: on cores shared with other
    jobs, wall time mostly measures how long the scheduler kept us waiting; CPU time measures the work.
    """
    reference()
    candidate()  # warm-up (TorchScript compiles on first call)
    ref_times, cand_times, ratios = [], [], []
    for _ in range(repeats):
        start = time.process_time()
        reference()
        middle = time.process_time()
        candidate()
        end = time.process_time()
        ref_times.append(middle - start)
        cand_times.append(end - middle)
        ratios.append((middle - start) / max(end - middle, 1e-9))
    return statistics.median(ref_times), statistics.median(cand_times), statistics.median(ratios)


@torch.no_grad()
def lstm_speed(reference: RNNModel, model: RNNModel, steps: int, batch: int, repeats: int) -> dict:
    """Tokens/s of the LSTM alone and of the whole model (embedding + LSTM + decoder), against ``reference``."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.ntoken, (steps, batch), generator=generator)
    embedded = model.encoder(ids)
    reference.eval()
    model.eval()
    ref_lstm, lstm, lstm_ratio = _paired(lambda: reference.rnn(embedded), lambda: model.rnn(embedded), repeats)
    ref_model, whole, model_ratio = _paired(lambda: reference(ids), lambda: model(ids), repeats)
    tokens = steps * batch
    return {"lstm_tokens_per_s": tokens / lstm, "model_tokens_per_s": tokens / whole, "lstm_speedup": lstm_ratio,
            "model_speedup": model_ratio, "reference_lstm_tokens_per_s": tokens / ref_lstm,
            "reference_model_tokens_per_s": tokens / ref_model}


def model_ranks(args, hidden: int) -> list[int]:
    return args.ranks or [hidden // 10, hidden // 5, 2 * hidden // 5]


def part_speed(args, results: dict) -> None:
    """Dense nn.LSTM vs the same weights in FactorizedLSTM (own dense loop) vs low-rank W_i / W_h / both."""
    torch.set_num_threads(1)
    # Rows of widths not re-measured now are kept, so one width can be timed again on its own.
    rows = [r for r in results.get("speed", {}).get("rows", []) if r["hidden"] not in args.speed_hidden]
    # Speed does not depend on the weight values: random models of the reference shapes (and a larger one).
    for hidden in args.speed_hidden:
        ranks = model_ranks(args, hidden)
        torch.manual_seed(0)
        base = RNNModel(10000, hidden, hidden, 2, 0.0).eval()
        dense_lstm = nn.LSTM(hidden, hidden, 2)
        dense_lstm.load_state_dict(base.rnn.nn_lstm_state_dict())
        reference = copy.deepcopy(base)
        reference.rnn = _FusedAdapter(dense_lstm)
        for batch in args.speed_batches:
            variants = [("FactorizedLSTM dense loop", None, None, 0)]
            variants += [(f"svd {name} rank {rank}", name, TARGETS[name], rank) for rank in ranks for name in TARGETS]
            for label, target_name, targets, rank in variants:
                if targets is None:
                    model = copy.deepcopy(base)
                    model.rnn.forward = _loop_forward(model.rnn)
                else:
                    model = _compress(LoadedModel(base, FAMILIES["word-lstm"], None), "svd", targets, rank).model
                speed = lstm_speed(reference, model, args.speed_steps, batch, args.repeats)
                row = {"hidden": hidden, "batch": batch, "variant": label, "targets": target_name, "rank": rank, **speed}
                rows.append(row)
                print(f"speed h={hidden} B={batch} {label:28s} lstm {row['lstm_tokens_per_s']:8.0f} tok/s (x{row['lstm_speedup']:.2f} vs "
                      f"nn.LSTM {row['reference_lstm_tokens_per_s']:.0f}) model {row['model_tokens_per_s']:7.0f} tok/s "
                      f"(x{row['model_speedup']:.2f})", flush=True)
    results["speed"] = {"threads": 1, "steps": args.speed_steps, "repeats": args.repeats,
                        "rows": sorted(rows, key=lambda r: (r["hidden"], r["batch"]))}


class _FusedAdapter(nn.Module):
    def __init__(self, lstm: nn.LSTM):
        super().__init__()
        self.lstm = lstm

    def forward(self, x, hidden=None):
        return self.lstm(x, hidden)


def _loop_forward(lstm: FactorizedLSTM):
    return lambda x, hidden=None: FactorizedLSTM.forward(lstm, x, hidden, fused=False)


def part_quality(args, results: dict, name: str, loaded: LoadedModel) -> None:
    corpus = reference_corpus(name)
    dense = evaluate_lm(loaded.model, corpus.test, max_tokens=args.eval_tokens)
    rows = []
    for target_name, targets in TARGETS.items():
        for method in METHODS:
            for rank in model_ranks(args, loaded.model.nhid):
                start = time.perf_counter()
                model = _compress(loaded, method, targets, rank)
                seconds = time.perf_counter() - start
                result = evaluate_lm(model.model, corpus.test, max_tokens=args.eval_tokens)
                row = {"targets": target_name, "method": method, "rank": rank, "perplexity": result["perplexity"],
                       "change": result["perplexity"] / dense["perplexity"] - 1, "compress_seconds": seconds,
                       "lstm_params": sum(p.numel() for p in model.model.rnn.parameters()),
                       "dense_lstm_params": sum(p.numel() for p in loaded.model.rnn.parameters())}
                rows.append(row)
                print(f"{name} {target_name:4s} {method:8s} rank {rank:3d}: ppl {row['perplexity']:8.2f} ({row['change']:+.1%})", flush=True)
    results.setdefault("models", {}).setdefault(name, {})["dense"] = dense
    results["models"][name]["quality"] = rows


def part_finetune(args, results: dict, name: str, loaded: LoadedModel) -> None:
    corpus = reference_corpus(name)
    dense = evaluate_lm(loaded.model, corpus.test, max_tokens=args.eval_tokens)["perplexity"]
    rows = []
    rank = args.finetune_rank or loaded.model.nhid // 5
    # Control: the reference models are trained for few epochs, so the dense model also gains from more steps.
    control = LoadedModel(copy.deepcopy(loaded.model), loaded.family, loaded.tokenizer, loaded.source)
    dense_tuned = finetune_lm(control.model, corpus, steps=args.finetune_steps, lr=args.finetune_lr, eval_tokens=args.eval_tokens)
    print(f"{name} finetune dense control: {dense_tuned['before']:.2f} -> {dense_tuned['after']:.2f}", flush=True)
    for target_name, targets in TARGETS.items():
        for method in METHODS:
            model = _compress(loaded, method, targets, rank)
            result = finetune_lm(model.model, corpus, steps=args.finetune_steps, lr=args.finetune_lr,
                                 eval_tokens=args.eval_tokens, dense_reference=dense)
            row = {"targets": target_name, "method": method, "rank": rank, **result,
                   "change_before": result["before"] / dense - 1, "change_after": result["after"] / dense - 1}
            rows.append(row)
            print(f"{name} finetune {target_name:4s} {method:8s} rank {rank}: {result['before']:.2f} -> "
                  f"{result['after']:.2f} (dense {dense:.2f}, recovery {result.get('recovery', float('nan')):.2f}) "
                  f"in {result['seconds']:.0f}s", flush=True)
    block = {"dense": dense, "dense_finetuned": dense_tuned, "steps": args.finetune_steps, "rank": rank, "lr": args.finetune_lr,
             "rows": rows}
    model = results.setdefault("models", {}).setdefault(name, {})
    # Runs with other steps / learning rates stay; the longest one is what the claims and plots use.
    runs = [run for run in finetune_runs(model) if (run["steps"], run["lr"]) != (block["steps"], block["lr"])] + [block]
    model["finetune_runs"] = sorted(runs, key=lambda run: (run["steps"], run["lr"]))
    model["finetune"] = max(runs, key=lambda run: run["steps"])


def finetune_runs(model: dict) -> list[dict]:
    return model.get("finetune_runs") or ([model["finetune"]] if "finetune" in model else [])


def part_norms(args, results: dict, name: str, loaded: LoadedModel) -> None:
    """Norms per LSTM matrix, and the perplexity change of compressing that one matrix alone."""
    corpus = reference_corpus(name)
    dense = evaluate_lm(loaded.model, corpus.test, max_tokens=args.eval_tokens)["perplexity"]
    norms = model_norms(loaded, groups=("W_i", "W_h"))
    changes = {}
    rank = args.norms_rank or loaded.model.nhid // 10
    for row in norms:
        model = _compress(loaded, "svd", (row["name"],), rank)
        changes[row["name"]] = evaluate_lm(model.model, corpus.test, max_tokens=args.eval_tokens)["perplexity"] - dense
        row["perplexity_change"] = changes[row["name"]]
        print(f"{name} norms {row['name']}: L1 {row['l1']:.1f} nuclear {row['nuclear']:.2f} std(row L1) {row['row_l1_std']:.3f} "
              f"-> ppl change {changes[row['name']]:+.2f}", flush=True)
    results.setdefault("models", {}).setdefault(name, {})["norms"] = {"rank": rank, "rows": norms,
                                                                     "correlation": correlate(norms, changes)}


def write_report(args, results: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "lstm.json").write_text(json.dumps(results, indent=2) + "\n")
    # Parts run separately add to one report: every command that contributed, in order.
    commands = "\n".join(f"- `{c}`" for c in results.get("commands", []))
    lines = [f"# Low-rank LSTM language models\n", f"Commands (in order; a later run of a part replaces that part's rows for its model, fine-tuning only those of the same steps and lr):\n\n{commands}\n",
             results.get("notes", "") + "\n"]
    for name, model in results.get("models", {}).items():
        if "training" in model:
            t = model["training"]
            phases = [e["valid_perplexity"] for e in t["epochs"]] + [e["valid_perplexity"] for phase in t.get("finish", []) for e in phase]
            lines.append(f"## {name}\n\nReference: {t['description']}; trained {t['train_seconds']:.0f}s "
                         f"({t['threads']} thread(s), shared cores), validation perplexity after each epoch or phase "
                         f"{' / '.join(f'{p:.1f}' for p in phases)}, test perplexity (full test set) {t['test_perplexity']:.2f}.\n")
        if "dense" in model:
            lines.append(f"Dense perplexity on the first {model['dense']['tokens']} test tokens: {model['dense']['perplexity']:.2f}\n")
        if "quality" in model:
            ranks = sorted({r["rank"] for r in model["quality"]})
            lines.append("| targets | method | " + " | ".join(f"rank {r}" for r in ranks) + " |")
            lines.append("|---|---|" + "---|" * len(ranks))
            for target_name in TARGETS:
                for method in METHODS:
                    cells = [r for r in model["quality"] if r["targets"] == target_name and r["method"] == method]
                    lines.append(f"| {target_name} | {method} | " + " | ".join(f"{r['perplexity']:.1f} ({r['change']:+.1%})" for r in cells) + " |")
            lines.append("")
        for f in finetune_runs(model):
            lines.append(f"Fine-tuning at rank {f.get('rank', f['rows'][0]['rank'])}: {f['steps']} SGD steps (lr {f['lr']}, batch 20 x bptt 35), all parameters. "
                         f"Control: the dense model fine-tuned the same way goes {f['dense_finetuned']['before']:.1f} -> "
                         f"{f['dense_finetuned']['after']:.1f}. Recovery = (before - after) / (before - dense before).\n")
            control = f["dense_finetuned"]["after"]
            lines.append("Recovery above 1 means the compressed model ends better than the dense one did before fine-tuning "
                         "(a reference trained for few epochs is under-trained); the fair comparison is the last column, against "
                         "the dense model fine-tuned the same way.\n")
            lines.append("| targets | method | before | after | recovery | vs fine-tuned dense | seconds |\n|---|---|---|---|---|---|---|")
            for r in f["rows"]:
                lines.append(f"| {r['targets']} | {r['method']} | {r['before']:.1f} ({r['change_before']:+.1%}) | "
                             f"{r['after']:.1f} ({r['change_after']:+.1%}) | {_recovery_cell(r.get('recovery'))} | "
                             f"{r['after'] / control - 1:+.1%} | {r['seconds']:.0f} |")
            lines.append("")
        if "norms" in model:
            n = model["norms"]
            lines.append(f"Norms, and perplexity change when that matrix alone gets SVD rank {n['rank']}:\n")
            lines.append("| matrix | L1 | nuclear | std(row L1) | ppl change |\n|---|---|---|---|---|")
            for r in n["rows"]:
                lines.append(f"| {r['name']} | {r['l1']:.1f} | {r['nuclear']:.2f} | {r['row_l1_std']:.3f} | {r['perplexity_change']:+.2f} |")
            lines.append("\nCorrelation with the perplexity change (4 matrices per model: indicative only): " + ", ".join(
                f"{k} pearson {v['pearson']:.2f} / spearman {v['spearman']:.2f}" for k, v in n["correlation"].items()) + "\n")
    lines += summarize(results)
    if "speed" in results:
        s = results["speed"]
        lines.append(f"## Speed (1 thread, {s['steps']} steps, median of {s['repeats']}; tokens per CPU-second of the process, "
                     "because the 2 cores were shared with other jobs: training and other benchmarks)\n")
        lines.append("Each variant is timed interleaved with dense nn.LSTM (fused kernel, same weights); the speed-up is the "
                     "median of the per-pair ratios. 'model' = embedding + LSTM + decoder (10k-word softmax layer).\n")
        lines.append("| hidden | batch | variant | LSTM tok/s | nn.LSTM tok/s | LSTM speed-up | model tok/s | model speed-up |\n|---|---|---|---|---|---|---|---|")
        for r in s["rows"]:
            lines.append(f"| {r['hidden']} | {r['batch']} | {r['variant']} | {r['lstm_tokens_per_s']:.0f} | {r['reference_lstm_tokens_per_s']:.0f} | "
                         f"{r['lstm_speedup']:.2f} | {r['model_tokens_per_s']:.0f} | {r['model_speedup']:.2f} |")
        lines.append("")
    (RESULTS / "lstm.md").write_text("\n".join(lines) + "\n")


def _recovery_cell(recovery) -> str:
    # Undefined when compression cost nothing (the compressed model was already at or below dense).
    return "-" if recovery is None or recovery != recovery else f"{recovery:.2f}"


def summarize(results: dict) -> list[str]:
    """The issue's claims, computed from the rows above (nothing typed in by hand)."""
    lines = ["## Claims, as measured\n"]
    speed = {(r["hidden"], r["batch"], r["targets"], r["rank"]): r for r in results.get("speed", {}).get("rows", []) if r["targets"]}
    for name, model in results.get("models", {}).items():
        rows = model.get("quality", [])
        if not rows:
            continue
        mean = lambda cells: sum(cells) / len(cells) if cells else float("nan")  # noqa: E731
        for method in METHODS:
            wi = mean([r["change"] for r in rows if r["targets"] == "W_i" and r["method"] == method])
            wh = mean([r["change"] for r in rows if r["targets"] == "W_h" and r["method"] == method])
            verdict = "no clear difference (within 0.2 points)" if abs(wi - wh) < 0.002 else f"{'W_i' if wi < wh else 'W_h'} tolerates compression better"
            lines.append(f"- {name}, {method}: mean perplexity change over ranks, W_i only {wi:+.2%} vs W_h only {wh:+.2%} -> {verdict}")
        wins = sum(1 for r in rows if r["method"] != "prune" and r["perplexity"] < next(
            p["perplexity"] for p in rows if p["method"] == "prune" and p["targets"] == r["targets"] and p["rank"] == r["rank"]))
        total = sum(1 for r in rows if r["method"] != "prune")
        lines.append(f"- {name}: factorization (svd/seminmf) beats magnitude pruning at the same parameter count in {wins} of {total} settings")
        hidden = results.get("models", {}).get(name, {}).get("hidden", 200)
        for batch in (1, 10):
            ok = [(speed[(hidden, batch, r["targets"], r["rank"])]["lstm_speedup"], r) for r in rows
                  if r["method"] == "svd" and r["change"] <= 0.05 and (hidden, batch, r["targets"], r["rank"]) in speed]
            if ok:
                best, row = max(ok, key=lambda item: item[0])
                lines.append(f"- {name}, batch {batch}: best measured LSTM speed-up within +5% perplexity before fine-tuning: "
                             f"x{best:.2f} ({row['targets']} rank {row['rank']}, {row['change']:+.1%})")
        tuned = model.get("finetune", {}).get("rows", [])
        for r in tuned:
            key = (hidden, 10, r["targets"], r["rank"])
            if key in speed and r["method"] == "svd":
                control = model["finetune"]["dense_finetuned"]["after"]
                lines.append(f"- {name}, after fine-tuning, svd {r['targets']} rank {r['rank']}: {r['change_after']:+.1%} perplexity "
                             f"vs the dense model before fine-tuning, {r['after'] / control - 1:+.1%} vs the dense model fine-tuned alike, "
                             f"at x{speed[key]['lstm_speedup']:.2f} LSTM speed (batch 10)")
    lines.append("")
    return lines


def plot(args, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name, model in results.get("models", {}).items():
        if "quality" not in model:
            continue
        figure, axes = plt.subplots(1, 3, figsize=(13, 4), sharey=True)
        tuned = model.get("finetune", {})
        for axis, target_name in zip(axes, TARGETS):
            for method in METHODS:
                cells = [r for r in model["quality"] if r["targets"] == target_name and r["method"] == method]
                line, = axis.plot([r["rank"] for r in cells], [r["perplexity"] for r in cells], marker="o", label=method)
                after = [r for r in tuned.get("rows", []) if r["targets"] == target_name and r["method"] == method]
                axis.plot([r["rank"] for r in after], [r["after"] for r in after], marker="o", linestyle="none", markersize=9,
                          markerfacecolor="none", color=line.get_color(), label=f"{method}, fine-tuned")
            axis.axhline(model["dense"]["perplexity"], color="gray", linestyle="--", label="dense")
            if tuned:
                axis.axhline(tuned["dense_finetuned"]["after"], color="gray", linestyle=":", label="dense, fine-tuned alike")
            axis.set_title(f"{name}: {target_name}")
            axis.set_xlabel("rank (pruning: same parameter count)")
            axis.set_yscale("log")
        axes[0].set_ylabel("test perplexity")
        axes[0].legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(RESULTS / f"lstm_{name}_perplexity.png", dpi=110)
        plt.close(figure)
    if "speed" in results:
        rows = results["speed"]["rows"]
        widths = sorted({r["hidden"] for r in rows})
        figure, axes = plt.subplots(1, len(widths), figsize=(6 * len(widths), 4), squeeze=False)
        for axis, hidden in zip(axes[0], widths):
            for batch in args.speed_batches:
                for target_name in TARGETS:
                    cells = [r for r in rows if r["hidden"] == hidden and r["batch"] == batch and r["targets"] == target_name]
                    axis.plot([r["rank"] for r in cells], [r["lstm_speedup"] for r in cells], marker="o", label=f"{target_name}, batch {batch}")
            axis.axhline(1.0, color="gray", linestyle="--")
            axis.set_title(f"LSTM 2x{hidden}: speed-up over nn.LSTM (1 thread)")
            axis.set_xlabel("rank")
            axis.set_ylabel("tokens/s ratio")
            axis.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(RESULTS / "lstm_speed.png", dpi=110)
        plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="ptb-small")
    parser.add_argument("--parts", default="speed,quality,finetune,norms")
    parser.add_argument("--report-only", action="store_true", help="rewrite lstm.md and the plots from lstm.json, measure nothing")
    parser.add_argument("--ranks", default="auto", help="'auto': hidden/10, hidden/5, 2 hidden/5 of each model")
    parser.add_argument("--eval-tokens", type=int, default=20000)
    parser.add_argument("--finetune-rank", type=int, default=None, help="default hidden/5")
    parser.add_argument("--finetune-steps", type=int, default=60)
    parser.add_argument("--finetune-lr", type=float, default=5.0)
    parser.add_argument("--norms-rank", type=int, default=None, help="default hidden/10")
    parser.add_argument("--speed-steps", type=int, default=64)
    parser.add_argument("--speed-batches", default="1,10")
    parser.add_argument("--speed-hidden", default="200,400,650", help="LSTM widths to time (rows of other widths are kept)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    args.ranks = None if args.ranks == "auto" else [int(r) for r in args.ranks.split(",")]
    args.speed_hidden = [int(h) for h in args.speed_hidden.split(",")]
    args.speed_batches = [int(b) for b in args.speed_batches.split(",")]
    parts = set(args.parts.split(","))
    command = "python benchmarks/lstm.py " + " ".join(sys.argv[1:])
    torch.set_num_threads(args.threads)
    path = RESULTS / "lstm.json"
    results = json.loads(path.read_text()) if path.is_file() else {}  # parts run separately add to one report
    if args.report_only:
        write_report(args, results)
        plot(args, results)
        return
    results["notes"] = (f"Perplexity: the example's evaluation (batch 10, bptt 35, state carried) on the first "
                        f"{args.eval_tokens} test tokens. Pruning keeps as many entries as the rank-k factorization "
                        f"has parameters (k (m + n)). {args.threads} thread(s) for quality runs.")
    results.setdefault("commands", []).append(command)
    if "speed" in parts:
        part_speed(args, results)
        torch.set_num_threads(args.threads)
        write_report(args, results)
    for name in [m for m in args.models.split(",") if m]:
        if not parts & {"quality", "finetune", "norms"}:
            break
        loaded = reference_model(name, log=print)
        training = json.loads(_training_file(name).read_text())
        from lmshrink.models.lstm import REFERENCES

        results.setdefault("models", {}).setdefault(name, {})["training"] = {
            "description": REFERENCES[name].description, "train_seconds": training["train_seconds"],
            "threads": training["threads"], "test_perplexity": training["test"]["perplexity"],
            "epochs": training["epochs"], "finish": [phase["epochs"] for phase in training.get("finish", [])]}
        results["models"][name]["hidden"] = loaded.model.nhid
        for part, function in (("quality", part_quality), ("norms", part_norms), ("finetune", part_finetune)):
            if part in parts:
                function(args, results, name, loaded)
                write_report(args, results)
    write_report(args, results)
    plot(args, results)


def _training_file(name: str) -> Path:
    from lmshrink.models.lstm import reference_dir

    return reference_dir(name) / "training.json"


if __name__ == "__main__":
    main()
