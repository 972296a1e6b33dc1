"""The lmshrink command line: a thin layer over the Python API (load_model, compress, save, load, evaluate)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import torch

from lmshrink.errors import LmshrinkError

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_METHOD = "fwhiten"  # best measured at --ratio 0.8 on SmolLM2 (benchmarks/results/importance.md)
DEFAULT_RATIO = 0.8


class _Group(click.Group):
    """Turns lmshrink's own errors into one line on stderr and exit status 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LmshrinkError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="lmshrink")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for torch (default: torch's choice).")
def main(threads):
    """Shrink language models with low-rank and tensor decompositions, and measure what it cost.

    MODEL is a built-in name (smollm2-135m, minilm-l6), a Hugging Face directory, a .gguf file, or a
    directory saved by lmshrink. DATA is a text file, a folder with train/test files (WikiText-2, PTB),
    'wikitext-2' or 'ptb' (from the shared data folder, LMSHRINK_DATA), or 'stdlib'.
    """
    if threads:
        torch.set_num_threads(threads)


def _method_options(command):
    """Add every registered method's own options (e.g. --groups, --bits) to the compress command."""
    from lmshrink.methods import all_methods

    seen = {}
    for method in all_methods().values():
        for option in method.options:
            seen.setdefault(option.name, option)
    for option in sorted(seen.values(), key=lambda o: o.name, reverse=True):
        flag = option.name.replace("_", "-")
        if option.type is bool:
            command = click.option(f"--{flag}/--no-{flag}", option.name, default=None,
                                   help=f"{option.help} [default: {option.default}]")(command)
            continue
        kind = click.Choice([str(c) for c in option.choices]) if option.choices else option.type
        command = click.option(f"--{flag}", option.name, type=kind, default=None,
                               help=f"{option.help} [default: {option.default}]")(command)
    return command


def _method_help() -> str:
    from lmshrink.methods import all_methods

    return "; ".join(f"{m.name}: {m.summary}" for m in all_methods().values())


def _eval_summary(loaded, corpus, tokens, window, progress, sentences=None, reference=None) -> dict:
    from lmshrink.accounting import count_bytes, count_params
    from lmshrink.evaluate import corpus_perplexity, fidelity, pooled_embeddings, throughput

    summary = {"params": count_params(loaded.model), "bytes": count_bytes(loaded.model)}
    if loaded.causal:
        result = corpus_perplexity(loaded, corpus, tokens=tokens, window=window, progress=progress)
        summary.update(perplexity=result["perplexity"], eval_tokens=result["tokens"])
    else:
        summary["perplexity"] = None  # encoders have no next-token loss; fidelity measures them
        if sentences and reference is not None:
            summary["fidelity"] = fidelity(reference, pooled_embeddings(loaded, sentences))
    summary["tokens_per_s"] = throughput(loaded)["tokens_per_s"]
    return summary


def _print_table(title: str, rows: list[list], headers: list[str]):
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for header in headers:
        table.add_column(header, justify="right" if header not in ("", "module", "status") else "left")
    for row in rows:
        table.add_row(*[_fmt(v) for v in row])
    Console(stderr=False).print(table)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e5 else f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


common_eval = [
    click.option("--data", "data", default=None, help="Evaluation/calibration text (see above). Default: WikiText-2 from the shared data folder if present, else Python's stdlib source."),
    click.option("--tokens", type=click.IntRange(min=2), default=8192, show_default=True, help="Evaluation tokens (first N of the test text)."),
    click.option("--window", type=click.IntRange(min=2), default=512, show_default=True, help="Window length in tokens (perplexity and calibration)."),
    click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout instead of tables."),
]


def _with(options):
    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


@main.command()
@click.argument("model", default=DEFAULT_MODEL, required=False)
@click.option("--method", default=DEFAULT_METHOD, show_default=True, help="Factorization method. " + "see `lmshrink methods`.")
@click.option("--ratio", type=float, default=None, help="Each targeted matrix keeps R times its dense parameter count (0 < R <= 1). Default 0.8 when no --rank/--energy/--params.")
@click.option("--rank", type=int, default=None, help="The same rank K for every targeted matrix (1 <= K <= min(m, n)).")
@click.option("--energy", type=float, default=None, help="Smallest rank keeping E of each matrix's squared singular values (0 < E <= 1).")
@click.option("--params", type=int, default=None,
              help="Budget: the targeted matrices keep at most N parameters in all (the global ratio N / their dense count; "
                   "with --allocation sensitivity, spent where it costs least).")
@click.option("--targets", multiple=True, default=("linears",), show_default=True,
              help="Modules to compress: linears, attention, mlp, embedding, lm_head, or a glob on module names (repeatable).")
@click.option("--multiple-of", type=click.IntRange(min=1), default=1, show_default=True, help="Round ranks down to a multiple of this.")
@click.option("--allocation", default="uniform", show_default=True, help="Rank allocation across targets (uniform, or a budgeted one when available).")
@click.option("--max-shift", type=float, default=0.25, show_default=True,
              help="--allocation sensitivity: each rank stays within +-this fraction of its uniform rank (0: uniform).")
@click.option("--calibration-windows", type=click.IntRange(min=1), default=32, show_default=True, help="Calibration windows from the train text (methods that calibrate).")
@click.option("--untie-head", is_flag=True,
              help="A token embedding tied to the output layer: compress the input side only, the output layer keeps the "
                   "original table (the model grows by V x d; for analysis).")
@click.option("--finetune-steps", type=click.IntRange(min=0), default=0, show_default=True,
              help="After compressing, train the factors for this many steps of one window of train text (causal LMs; refinement training).")
@click.option("--finetune-lr", type=float, default=1e-4, show_default=True, help="AdamW learning rate of --finetune-steps.")
@click.option("--finetune-distill", is_flag=True,
              help="Train toward the uncompressed model's next-token distributions (KL) instead of the text's tokens; keeps a copy of the original in memory.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Where to save the compressed model. Default ./compressed/<model>-<method>.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it holds an earlier lmshrink save.")
@click.option("--no-save", is_flag=True, help="Measure only; do not save.")
@_with(common_eval)
@_method_options
def compress(model, method, ratio, rank, energy, params, targets, multiple_of, allocation, max_shift, calibration_windows, untie_head, finetune_steps,
             finetune_lr, finetune_distill, out, overwrite, no_save, data, tokens, window, as_json, **method_options):
    """Compress MODEL and report params, bytes, perplexity and tokens/s before and after.

    With no arguments: SmolLM2-135M, the default method, --ratio 0.8, the default text.
    """
    import lmshrink
    from lmshrink.evaluate import pooled_embeddings, sentences as pick_sentences
    from lmshrink.methods import get_method
    from lmshrink.surgery import check_plan

    progress = not as_json and sys.stderr.isatty()
    if ratio is None and rank is None and energy is None and params is None:
        ratio = DEFAULT_RATIO
    method_spec = get_method(method)
    given = {k: v for k, v in method_options.items() if v is not None}
    foreign = sorted(set(given) - {o.name for o in method_spec.options})
    if foreign:
        raise lmshrink.errors.InvalidArgument(", ".join(f"--{f.replace('_', '-')}" for f in foreign),
                                              f"not an option of method {method!r}",
                                              ", ".join(f"--{o.name.replace('_', '-')}" for o in method_spec.options) or "none")
    plan = lmshrink.Plan(method=method, targets=targets, ratio=ratio, rank=rank, energy=energy, params=params, multiple_of=multiple_of,
                         allocation=allocation, max_shift=max_shift, options=given, calibration_windows=calibration_windows,
                         window=window, untie_head=untie_head)
    corpus = lmshrink.load_corpus(data)
    out_dir = Path(out) if out else Path("compressed") / f"{Path(str(model)).stem}-{method}"
    overwrite = overwrite or out is None  # the default place holds our own earlier result; save() still refuses foreign dirs
    if not no_save and out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise lmshrink.errors.InvalidArgument("--out", f"{str(out_dir)!r} exists and is not empty", "a new or empty directory, or --overwrite")
        if not (out_dir / "lmshrink.json").is_file():
            raise lmshrink.errors.InvalidArgument("--out", f"{str(out_dir)!r} is not an lmshrink directory; refusing to overwrite it",
                                                  "a new or empty directory, or one lmshrink saved before")
    if not finetune_lr > 0:
        raise lmshrink.errors.InvalidArgument("--finetune-lr", f"{finetune_lr} is not positive", "a learning rate > 0")
    loaded = lmshrink.load_model(model)
    if finetune_steps and not loaded.causal:
        raise lmshrink.errors.InvalidArgument("--finetune-steps", f"{model!r} is not a causal language model",
                                              "0 for encoders (refinement training uses next-token loss)")
    check_plan(loaded, plan)  # bad targets or ranks fail now, not after minutes of evaluation
    texts = pick_sentences(corpus.test, 64) if not loaded.causal else None
    reference = pooled_embeddings(loaded, texts) if texts else None
    before = _eval_summary(loaded, corpus, tokens, window, progress, texts, reference)
    teacher = None
    if finetune_steps and finetune_distill:
        import copy

        teacher = lmshrink.LoadedModel(copy.deepcopy(loaded.model), loaded.family, loaded.tokenizer, loaded.source)
    report = lmshrink.compress(loaded, plan, data=corpus, progress=progress)
    tuned = None
    if finetune_steps:
        tuned = lmshrink.finetune(loaded, corpus, steps=finetune_steps, lr=finetune_lr, window=window, teacher=teacher,
                                  progress=progress)
        tuned = {k: tuned[k] for k in ("loss", "steps", "lr", "tokens", "trained_parameters", "seconds", "first_loss", "last_loss")}
        del teacher
    after = _eval_summary(loaded, corpus, tokens, window, progress, texts, reference)
    saved = None if no_save else str(lmshrink.save(loaded, out_dir, overwrite=overwrite))
    result = {
        "model": str(model), "method": method, "plan": plan.to_dict(), "data": corpus.source,
        **{key: {"before": before.get(key), "after": after.get(key)} for key in ("params", "bytes", "perplexity", "tokens_per_s")},
        "eval_tokens": after.get("eval_tokens"), "window": window,
        "fidelity": after.get("fidelity"), "compression_seconds": report.seconds, "calibration_seconds": report.stats_seconds,
        "finetune": tuned, "notes": report.notes, "saved_to": saved, "modules": report.modules,
    }
    if as_json:
        click.echo(json.dumps(result))
        return
    factorized = len(report.compressed)
    click.echo(f"model: {model}   method: {method} ({plan.amount()}, targets {', '.join(targets)}, allocation {allocation})")
    click.echo(f"data: {corpus.source}")
    click.echo(f"{factorized} of {len(report.modules)} targeted matrices factorized in {report.seconds:.1f} s"
               + (f"; {len(report.modules) - factorized} stay dense (factorized form not smaller)" if factorized < len(report.modules) else ""))
    rows = [["params", before["params"], after["params"], after["params"] / before["params"]],
            ["bytes", before["bytes"], after["bytes"], after["bytes"] / before["bytes"]]]
    if loaded.causal:
        rows.append([f"perplexity ({after['eval_tokens']:,} tokens, window {window})", before["perplexity"], after["perplexity"], after["perplexity"] / before["perplexity"]])
    else:
        rows.append(["embedding cosine vs original", 1.0, after["fidelity"]["cosine_mean"], after["fidelity"]["cosine_mean"]])
    rows.append(["tokens/s (forward, 256 tokens)", before["tokens_per_s"], after["tokens_per_s"], after["tokens_per_s"] / before["tokens_per_s"]])
    if tuned:
        click.echo(f"refinement training: {tuned['steps']} steps x {window} tokens in {tuned['seconds']:.0f} s, "
                   f"{tuned['loss']} loss {tuned['first_loss']:.3f} -> {tuned['last_loss']:.3f}")
    _print_table("before / after", rows, ["", "before", "after", "after/before"])
    for note in report.notes:
        click.echo(f"note: {note}")
    click.echo(f"saved to: {saved}" if saved else "not saved (--no-save)")


@main.command("eval")
@click.argument("model")
@click.option("--reference", default=None, help="Original model to measure fidelity against (encoders).")
@click.option("--tasks", default=None, help="lm-evaluation-harness tasks to run too, comma-separated (causal LMs; needs lm-eval: pip install 'lmshrink[eval]').")
@click.option("--include-path", type=click.Path(), default=None, help="A folder of extra lm-eval task YAML files (as lm-eval's --include_path).")
@click.option("--limit", type=click.FloatRange(min=0, min_open=True), default=None,
              help="lm-eval tasks: at most N documents per task (N >= 1), or that fraction of each task (N < 1).")
@_with(common_eval)
def eval_command(model, reference, tasks, include_path, limit, data, tokens, window, as_json):
    """Measure MODEL_OR_DIR: params, bytes, perplexity (causal LMs), fidelity (encoders, with --reference), tokens/s;
    with --tasks, lm-eval accuracies with their standard errors."""
    import lmshrink
    from lmshrink.evaluate import pooled_embeddings, sentences as pick_sentences

    progress = not as_json and sys.stderr.isatty()
    task_names, task_manager = _lm_eval_tasks(tasks, include_path, limit)  # bad task names fail before any measuring
    corpus = lmshrink.load_corpus(data)
    loaded = lmshrink.load_model(model)
    texts = ref = None
    if reference is not None and not loaded.causal:
        texts = pick_sentences(corpus.test, 64)
        ref = pooled_embeddings(lmshrink.load_model(reference), texts)
    summary = _eval_summary(loaded, corpus, tokens, window, progress, texts, ref)
    summary.update(model=str(model), data=corpus.source, window=window)
    if task_names:
        from lmshrink.lm_eval_model import evaluate_tasks

        summary["tasks"] = evaluate_tasks(loaded, task_names, task_manager, limit=int(limit) if limit and limit >= 1 else limit)
    if as_json:
        click.echo(json.dumps(summary))
        return
    rows = [["params", summary["params"]], ["bytes", summary["bytes"]]]
    if summary["perplexity"] is not None:
        rows.append([f"perplexity ({summary['eval_tokens']:,} tokens, window {window})", summary["perplexity"]])
    if summary.get("fidelity"):
        rows.append(["embedding cosine vs reference", summary["fidelity"]["cosine_mean"]])
    rows.append(["tokens/s (forward, 256 tokens)", summary["tokens_per_s"]])
    click.echo(f"data: {corpus.source}")
    _print_table(str(model), rows, ["", "value"])
    if task_names:
        _print_table("lm-eval tasks", [[task, metric, value, row.get(f"{metric}_stderr"), row["samples"]]
                                       for task, row in summary["tasks"].items() for metric, value in row.items()
                                       if metric != "samples" and not metric.endswith("_stderr")],
                     ["task", "metric", "value", "stderr", "documents"])


def _lm_eval_tasks(tasks, include_path, limit):
    """(task names, lm-eval TaskManager) for eval --tasks, checked; (None, None) without --tasks."""
    from lmshrink.errors import InvalidArgument

    if not tasks:
        given = [flag for flag, value in (("--include-path", include_path), ("--limit", limit)) if value is not None]
        if given:
            raise InvalidArgument(given[0], "only applies to lm-eval tasks", "--tasks TASK[,TASK...] with it, or leave it out")
        return None, None
    names = [name.strip() for name in tasks.split(",") if name.strip()]
    if not names:
        raise InvalidArgument("--tasks", f"{tasks!r} names no task", "TASK[,TASK...]")
    if limit is not None and limit > 1 and limit != int(limit):
        raise InvalidArgument("--limit", f"{limit} is neither a whole number of documents nor a fraction below 1", "N >= 1 or 0 < N < 1")
    try:
        from lmshrink.lm_eval_model import task_manager
    except ImportError as error:
        raise InvalidArgument("--tasks", f"lm-evaluation-harness is not installed ({error})", "pip install 'lmshrink[eval]'") from error
    import os

    # Tasks read local files here; never reach for the Hub on a machine that may be offline (lm-eval would hang, then fail).
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return names, task_manager(names, include_path)


@main.command()
@click.argument("model")
@click.option("--targets", multiple=True, default=("linears", "embedding"), show_default=True, help="Modules to inspect (as in compress).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("--data", default=None, help="Calibration text: adds the Fisher-based SVD-risk per matrix and for the model.")
@click.option("--calibration-windows", type=click.IntRange(min=1), default=16, show_default=True, help="Calibration windows (with --data).")
@click.option("--window", type=click.IntRange(min=2), default=512, show_default=True, help="Calibration window length (with --data).")
def inspect(model, targets, as_json, data, calibration_windows, window):
    """Per matrix: shape, params, effective rank, the energy kept at a few ratios; with --data, the SVD-risk."""
    import lmshrink
    from lmshrink.analysis import inspect_targets
    from lmshrink.plan import select_targets

    loaded = lmshrink.load_model(model)
    chosen = select_targets(loaded.candidates(), targets)
    rows = inspect_targets(chosen, progress=not as_json and sys.stderr.isatty())
    risk = None
    if data is not None:
        from lmshrink.analysis.svd_risk import add_risk_columns

        risk = add_risk_columns(loaded, chosen, rows, lmshrink.load_corpus(data), calibration_windows, window,
                                progress=not as_json and sys.stderr.isatty())
    if as_json:
        click.echo(json.dumps({"model": str(model), "matrices": rows, **({"svd_risk": risk} if risk else {})}))
        return
    if risk:
        click.echo(f"SVD-risk at ratio {risk['ratio']:g} (predicted loss increase of plain SVD, nats): "
                   f"{risk['total_svd_risk']:.4g} for the model")
    headers = ["module", "shape", "params", "effective rank"] + [k for k in rows[0] if k.startswith(("energy@", "svd_risk@", "fisher_gap@"))
                                                                   or k in ("l1", "nuclear", "row_l1_std")]
    _print_table(str(model), [[r["name"], "x".join(map(str, r["shape"])), r["params"], r["effective_rank"],
                               *[r[k] for k in headers[4:]]] for r in rows], headers)


@main.command()
def methods():
    """List the compression methods and their options."""
    from lmshrink.methods import all_methods

    for method in all_methods().values():
        extra = f" (calibrates: {', '.join(sorted(method.needs))})" if method.needs else ""
        click.echo(f"{method.name:12s} {method.summary}{extra}")
        for option in method.options:
            click.echo(f"{'':14s}--{option.name.replace('_', '-')}: {option.help} [default: {option.default}]")


@main.command()
@click.argument("model")
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True, help="Tokens to generate (greedy).")
@click.option("--reference", default=None, help="The original model: its greedy text is printed beside, to see what compression changed.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def generate(model, prompt, max_new_tokens, reference, as_json):
    """Greedy text from MODEL (a causal LM) after --prompt; with --reference, the original's text beside it."""
    import lmshrink
    from lmshrink.hf_compat import generate_text

    loaded = lmshrink.load_model(model)
    original = lmshrink.load_model(reference) if reference is not None else None
    for name, candidate in (("MODEL", loaded), ("--reference", original)):
        if candidate is not None and not candidate.causal:
            raise lmshrink.errors.InvalidArgument(name, f"{candidate.source!r} is an encoder",
                                                  "a causal language model (generation needs next-token logits)")
    result = {"model": str(model), "prompt": prompt, "max_new_tokens": max_new_tokens,
              "text": generate_text(loaded, prompt, max_new_tokens)}
    if original is not None:
        result.update(reference=str(reference), reference_text=generate_text(original, prompt, max_new_tokens))
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"prompt: {prompt}")
    click.echo(f"{model}: {result['text']}")
    if original is not None:
        click.echo(f"{reference}: {result['reference_text']}")


@main.command()
@click.argument("model_dir")
@click.option("--dense", is_flag=True, help="Multiply the factors back into dense weights (the only export there is).")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="A new or empty directory for the checkpoint.")
def export(model_dir, dense, out):
    """Write MODEL_DIR as a plain Hugging Face checkpoint (safetensors, the base architecture's config, tokenizer) that
    transformers loads without lmshrink. It computes what the compressed model does but is as large as the original."""
    from lmshrink.errors import InvalidArgument
    from lmshrink.export import export_dense

    if not dense:
        raise InvalidArgument("--dense", "not given", "--dense (factors multiplied back into the base architecture's dense weights)")
    click.echo(f"written: {export_dense(model_dir, out)}")


def _add_model_commands():
    # Commands that belong to one model family live beside it (word-level LSTMs: train, import checkpoints).
    from lmshrink.lstm_cli import COMMANDS

    for command in COMMANDS:
        main.add_command(command)


_add_model_commands()
