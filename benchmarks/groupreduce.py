"""GroupReduce (issue 4): embedding + softmax compression rate vs perplexity, against SVD, frequency-weighted SVD
without blocks, magnitude pruning and quantization alone at the same byte budget; quantized GroupReduce; refinement
training; and the speed of the block output layer.

    python benchmarks/groupreduce.py [--models smollm2,ptb-small] [--rates 2,4,6.6,10] [--eval-tokens 8192]

Compression rate = float32 bytes of the embedding and softmax matrices / bytes stored for them after compression
(factors, float16 scales, packed integers and the uint8 token -> group index all counted; pruning counts a float32
value plus a 16-bit column index per kept entry). Results are written after every run, so a partial run still
leaves a valid report: benchmarks/results/groupreduce.json, groupreduce.md, groupreduce.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from pathlib import Path

import torch

import lmshrink
from lmshrink.accounting import count_bytes
from lmshrink.decompose.prune import magnitude_prune
from lmshrink.frequencies import corpus_frequencies, count_tokens
from lmshrink.plan import select_targets

RESULTS = Path(__file__).resolve().parent / "results"
SMOLLM2 = "smollm2-135m"  # built-in name: fetched once into the lmshrink cache
PRUNE_INDEX_BYTES = 2  # a kept entry's column index (d <= 65536)


class Bench:
    """One reference model: how to copy it, evaluate it, and which tables are compressed."""

    def __init__(self, name: str, args):
        self.name, self.args = name, args
        if name == "smollm2":
            self.loaded = lmshrink.load_model(args.smollm2)
            self.corpus = lmshrink.load_corpus("wikitext-2")
            self.ids = None
            vocab = self.loaded.model.get_input_embeddings().weight.shape[0]
            self.frequencies = corpus_frequencies(self.loaded, self.corpus.train, vocab, name="wikitext-2 train", max_tokens=None)
            self.eval_note = f"WikiText-2 test, first {args.eval_tokens} tokens, windows of 512, no special tokens"
        else:
            from lmshrink.models.lstm import reference_corpus, reference_model

            self.loaded = reference_model(name, train=False)
            self.word_corpus = reference_corpus(name)
            self.corpus = lmshrink.load_corpus("ptb")
            vocab = len(self.word_corpus.vocab)
            self.frequencies = count_tokens(self.word_corpus.train, vocab, "ptb train word ids")
            self.eval_note = "PTB test, all tokens, batch 10, bptt 35 (the example's evaluation)"
        self.targets = [t.name for t in select_targets(self.loaded.candidates(), ("embedding", "lm_head"))]
        self.dense_bytes = sum(self._table_bytes(self.loaded.model.get_submodule(n)) for n in self.targets)
        self.freq_path = RESULTS / f"groupreduce-{name}-frequencies.json"
        self.frequencies.save(self.freq_path)

    @staticmethod
    def _table_bytes(module) -> int:
        # Bytes of the table itself: every stored tensor but a bias (which no method changes).
        return sum(t.numel() * t.element_size() for k, t in module.state_dict().items() if not k.endswith("bias"))

    def copy(self):
        return lmshrink.LoadedModel(copy.deepcopy(self.loaded.model), self.loaded.family, self.loaded.tokenizer, self.loaded.source)

    def perplexity(self, loaded) -> float:
        if self.name == "smollm2":
            from lmshrink.evaluate import corpus_perplexity

            return corpus_perplexity(loaded, self.corpus, self.args.eval_tokens, 512, progress=False)["perplexity"]
        from lmshrink.models.lstm import evaluate_lm

        return evaluate_lm(loaded.model, self.word_corpus.test)["perplexity"]

    def stored_bytes(self, loaded) -> int:
        seen, total = set(), 0
        for name in self.targets:
            module = loaded.model.get_submodule(name)
            if id(module) not in seen:
                seen.add(id(module))
                total += self._table_bytes(module)
        return total

    @property
    def shape(self):
        return tuple(self.loaded.model.get_submodule(self.targets[0]).weight.shape)


def ratio_for_rate(bench: Bench, rate: float, index_bytes: int) -> float:
    """Fraction of dense parameters whose float32 factors (plus the token index) take dense_bytes / rate."""
    vocab, dim = bench.shape
    tables = len(bench.targets)
    per_table = bench.dense_bytes / rate / tables - index_bytes * vocab
    return max(1e-4, per_table / 4 / (vocab * dim))


def run_config(bench: Bench, config: dict) -> dict:
    loaded = bench.copy()
    start = time.perf_counter()
    kind = config["method"]
    if kind == "prune":
        keep = bench.dense_bytes / config["target_rate"] / (4 + PRUNE_INDEX_BYTES) / (len(bench.targets) * bench.shape[0] * bench.shape[1])
        kept = 0
        with torch.no_grad():
            for name in bench.targets:
                module = loaded.model.get_submodule(name)
                pruned, mask = magnitude_prune(module.weight, keep)
                module.weight.copy_(pruned)
                kept += int(mask.sum())
        stored = kept * (4 + PRUNE_INDEX_BYTES)
        detail = {"keep_ratio": keep}
    else:
        plan = lmshrink.Plan(method=kind, targets=("embedding", "lm_head"), **config["plan"], options=config.get("options", {}))
        report = lmshrink.compress(loaded, plan, data=bench.corpus, progress=False)
        stored = bench.stored_bytes(loaded)
        detail = {"modules": [{k: m.get(k) for k in ("name", "layer", "relative_error", "rank")} for m in report.modules]}
        for name in bench.targets:
            module = loaded.model.get_submodule(name)
            if hasattr(module, "ranks"):
                detail.setdefault("ranks", {})[name] = module.ranks
                detail.setdefault("sizes", {})[name] = module.sizes
    seconds = time.perf_counter() - start
    ppl = bench.perplexity(loaded)
    row = {"model": bench.name, **config, "bytes": stored, "rate": bench.dense_bytes / stored, "perplexity": ppl,
           "compress_seconds": seconds, **detail}
    if config.get("finetune"):
        row["finetune"] = refine(bench, loaded, config["finetune"])
        row["perplexity_after_finetune"] = row["finetune"]["after"]
    return row


def refine(bench: Bench, loaded, steps: int) -> dict:
    if bench.name == "smollm2":
        from lmshrink.finetune import finetune

        report = finetune(loaded, bench.corpus, steps=steps, lr=bench.args.finetune_lr, window=512, progress=False)
        return {"steps": steps, "window": 512, "lr": bench.args.finetune_lr, "train": "factors", "seconds": report["seconds"],
                "first_loss": report["first_loss"], "last_loss": report["last_loss"], "after": bench.perplexity(loaded)}
    from lmshrink.models.lstm import finetune_lm

    result = finetune_lm(loaded.model, bench.word_corpus, steps=steps, lr=5.0)
    return {"steps": steps, "recipe": "word_language_model SGD lr 5, batch 20, bptt 35, all parameters",
            "seconds": result["seconds"], "after": result["after"]}


def configs(bench: Bench, args) -> list[dict]:
    gr = {"groups": args.groups, "refine_steps": args.refine_steps, "frequencies": str(bench.freq_path)}
    out = [{"method": "dense", "label": "dense"}]
    if args.finetune_steps:  # first after dense: the most expensive result, and the one a partial run should keep
        ratio = ratio_for_rate(bench, args.finetune_rate, 1)
        out.append({"label": "GroupReduce + refinement training", "method": "groupreduce", "target_rate": args.finetune_rate,
                    "plan": {"ratio": ratio}, "options": dict(gr), "finetune": args.finetune_steps})
    for rate in args.rates:
        ratio = ratio_for_rate(bench, rate, 1)
        plain_rank = max(1, int(bench.dense_bytes / rate / len(bench.targets) / 4 // sum(bench.shape)))
        out += [
            {"label": "GroupReduce", "method": "groupreduce", "target_rate": rate, "plan": {"ratio": ratio}, "options": dict(gr)},
            {"label": "SVD", "method": "svd", "target_rate": rate, "plan": {"rank": plain_rank}},
            {"label": "weighted SVD (1 group)", "method": "groupreduce", "target_rate": rate, "plan": {"ratio": ratio},
             "options": {**gr, "groups": 1, "refine_steps": 0}},
            {"label": "magnitude pruning", "method": "prune", "target_rate": rate},
        ]
    for bits in args.quant_bits:
        out.append({"label": "quantization alone", "method": "quantize", "bits": bits, "plan": {"ratio": 1.0}, "options": {"bits": bits}})
    for rate, bits in args.gr_quant:
        ratio = ratio_for_rate(bench, rate, 1)
        out.append({"label": "GroupReduce + quantization", "method": "groupreduce", "param_rate": rate, "bits": bits,
                    "plan": {"ratio": ratio}, "options": {**gr, "bits": bits}})
        out.append({"label": "SVD + quantization", "method": "groupreduce", "param_rate": rate, "bits": bits,
                    "plan": {"ratio": ratio}, "options": {**gr, "groups": 1, "refine_steps": 0, "weight_power": 0.0, "bits": bits}})
    for rate, bits in args.gr_quant[:1]:
        out.append({"label": "magnitude pruning", "method": "prune", "match": ("GroupReduce + quantization", rate, bits)})
    return out


@torch.no_grad()
def output_layer_speed(bench: Bench, rows: list[dict], args) -> list[dict]:
    """Time all-vocabulary logits of 512 hidden states: dense matmul vs the block layer at each measured rate."""
    from lmshrink.decompose.groupreduce import budget_for_ratio, groupreduce
    from lmshrink.layers.block import BlockLowRankOutput

    weight = bench.loaded.model.get_submodule(bench.targets[-1]).weight.detach()
    hidden = torch.randn(512, weight.shape[1], generator=torch.Generator().manual_seed(0))

    def timed(function):
        function()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            function()
            times.append(time.perf_counter() - start)
        return sorted(times)[2]

    dense = timed(lambda: hidden @ weight.T)
    out = []
    for rate in args.rates[:2]:
        ratio = ratio_for_rate(bench, rate, 1)
        factors = groupreduce(weight.float(), bench.frequencies.smoothed(), budget_for_ratio(tuple(weight.shape), ratio),
                              groups=args.groups, refine_steps=0)
        layer = BlockLowRankOutput.from_factors(factors)
        block = timed(lambda: layer(hidden))
        out.append({"model": bench.name, "rate": rate, "dense_seconds": dense, "block_seconds": block,
                    "speedup": dense / block, "threads": torch.get_num_threads(), "tokens": 512})
    return out


def write(results: dict, args) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "groupreduce.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"# GroupReduce benchmark (issue 4)", "", "Command:", "", f"    {results['command']}", ""]
    for model, info in results["models"].items():
        lines += [f"## {model}", "", f"- tables: {', '.join(info['targets'])}, dense float32 bytes {info['dense_bytes']:,}",
                  f"- perplexity: {info['eval']}", f"- frequencies: {info['frequencies']}",
                  f"- GroupReduce settings: groups {args.groups}, sqrt-frequency row weights, equal-size frequency split, "
                  f"ranks proportional to group mean weight, {args.refine_steps} refinement rounds", ""]
        rows = [r for r in results["rows"] if r["model"] == model]
        dense = next((r["perplexity"] for r in rows if r["method"] == "dense"), None)
        lines += ["| method | bits | rate (x) | bytes | perplexity | vs dense |", "| --- | --- | --- | --- | --- | --- |"]
        for r in sorted(rows, key=lambda r: (r["label"], r.get("rate", 1))):
            change = f"{100 * (r['perplexity'] / dense - 1):+.1f}%" if dense else ""
            lines.append(f"| {r['label']} | {r.get('bits') or 32} | {r.get('rate', 1):.2f} | {r.get('bytes', 0):,} | "
                         f"{r['perplexity']:.2f} | {change} |")
            if "finetune" in r:
                ft = r["finetune"]
                lines.append(f"| ... after {ft['steps']} refinement steps | 32 | {r['rate']:.2f} | {r['bytes']:,} | "
                             f"{ft['after']:.2f} | {100 * (ft['after'] / dense - 1):+.1f}% |")
        lines.append("")
    if results.get("speed"):
        lines += ["## Output layer speed (all-vocabulary logits of 512 hidden states, median of 5)", "",
                  "| model | rate (x) | dense s | block s | speedup | threads |", "| --- | --- | --- | --- | --- | --- |"]
        for s in results["speed"]:
            lines.append(f"| {s['model']} | {s['rate']} | {s['dense_seconds']:.4f} | {s['block_seconds']:.4f} | {s['speedup']:.2f} | {s['threads']} |")
        lines.append("")
    lines += results.get("notes", [])
    (RESULTS / "groupreduce.md").write_text("\n".join(lines) + "\n")
    plot(results)


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"])
    if not models:
        return
    figure, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.5), squeeze=False)
    for axis, model in zip(axes[0], models):
        rows = [r for r in results["rows"] if r["model"] == model]
        dense = next((r["perplexity"] for r in rows if r["method"] == "dense"), None)
        labels = sorted({r["label"] for r in rows if r["method"] != "dense"})
        for label in labels:
            points = sorted((r["rate"], r["perplexity"]) for r in rows if r["label"] == label)
            axis.plot(*zip(*points), marker="o", label=label)
            tuned = [(r["rate"], r["perplexity_after_finetune"]) for r in rows if r["label"] == label and "perplexity_after_finetune" in r]
            if tuned:
                axis.plot(*zip(*tuned), marker="*", markersize=12, linestyle="none", label=f"{label} (after)")
        if dense:
            axis.axhline(dense, color="black", linestyle=":", label=f"dense {dense:.2f}")
            axis.axhline(dense * 1.05, color="gray", linestyle="--", linewidth=0.8, label="dense +5%")
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("embedding + softmax compression rate (x, bytes)")
        axis.set_ylabel("perplexity")
        axis.set_title(model)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(RESULTS / "groupreduce.png", dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="smollm2")
    parser.add_argument("--smollm2", default=SMOLLM2)
    parser.add_argument("--rates", default="2,4,6.6,10")
    parser.add_argument("--quant-bits", default="8,4,2")
    parser.add_argument("--gr-quant", default="6.6:8,4:4", help="param_rate:bits pairs for quantized GroupReduce / SVD")
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--refine-steps", type=int, default=5)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--finetune-steps", type=int, default=0)
    parser.add_argument("--finetune-rate", type=float, default=6.6)
    parser.add_argument("--finetune-lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--append", action="store_true", help="keep rows of other models already in the JSON")
    args = parser.parse_args()
    args.rates = [float(x) for x in args.rates.split(",") if x]
    args.quant_bits = [int(x) for x in args.quant_bits.split(",") if x]
    args.gr_quant = [(float(p.split(":")[0]), int(p.split(":")[1])) for p in args.gr_quant.split(",") if p]
    torch.set_num_threads(args.threads)
    results = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "models": {}, "rows": [], "speed": [],
               "notes": []}
    path = RESULTS / "groupreduce.json"
    if args.append and path.is_file():
        previous = json.loads(path.read_text())
        keep = set(args.models.split(","))
        results["models"] = {k: v for k, v in previous["models"].items() if k not in keep}
        results["rows"] = [r for r in previous["rows"] if r["model"] not in keep]
        results["speed"] = [s for s in previous.get("speed", []) if s["model"] not in keep]
        results["command"] = previous["command"] + "  &&  " + results["command"]
    for name in args.models.split(","):
        bench = Bench(name, args)
        results["models"][name] = {"targets": bench.targets, "dense_bytes": bench.dense_bytes, "eval": bench.eval_note,
                                   "frequencies": f"{bench.frequencies.source}, {bench.frequencies.tokens:,} tokens, "
                                                  f"{int((bench.frequencies.counts == 0).sum()):,} of {bench.frequencies.vocab_size:,} "
                                                  f"unseen (add-{bench.frequencies.smoothing:g} smoothing)"}
        results["speed"] += output_layer_speed(bench, results["rows"], args)
        for config in configs(bench, args):
            if config["method"] == "dense":
                row = {"model": name, **config, "bytes": bench.dense_bytes, "rate": 1.0, "perplexity": bench.perplexity(bench.loaded)}
            else:
                if "match" in config:
                    label, rate, bits = config.pop("match")
                    match = [r for r in results["rows"] if r["model"] == name and r["label"] == label
                             and r.get("param_rate") == rate and r.get("bits") == bits]
                    if not match:
                        continue
                    config["target_rate"] = match[0]["rate"]
                row = run_config(bench, config)
            results["rows"].append(row)
            print(f"{name} {row['label']:<36} bits={row.get('bits') or 32:<2} rate={row['rate']:6.2f} "
                  f"ppl={row['perplexity']:9.2f}" + (f" -> {row['perplexity_after_finetune']:.2f}" if "finetune" in row else ""),
                  flush=True)
            write(results, args)


if __name__ == "__main__":
    main()
