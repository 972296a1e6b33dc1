"""The lmshrink command line: a thin layer over the Python API (load_model, compress, save, load, evaluate)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
from pathlib import Path

import click
import torch

from lmshrink.bounds import Bounds
from lmshrink.data import DATA_CHOICES
from lmshrink.errors import DistributedError, InvalidArgument, LmshrinkError
from lmshrink.models.builtin import BUILTINS, cache_dir

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_METHOD = "fwhiten"  # best measured at --ratio 0.8 on SmolLM2 (benchmarks/results/importance.md)
DEFAULT_RATIO = 0.8


class _OneLineError(click.ClickException):
    """An error shown as one line, ``error: ARG: what was wrong; allowed: ...``, exit status 2."""

    exit_code = 2

    def show(self, file=None):
        lines = [line.strip() for line in self.message.splitlines() if line.strip()]
        click.echo(f"error: {' / '.join(lines)}", err=True)  # one line even if a message has several


def _usage_line(error: click.UsageError) -> str:
    """Click's own usage errors (bad values, missing or unknown options) in lmshrink's one-line format."""
    ctx = error.ctx
    command = ctx.command_path if ctx is not None else "lmshrink"
    if isinstance(error, click.NoSuchOption):
        close = f"close matches: {', '.join(sorted(error.possibilities))}" if error.possibilities else f"see `{command} --help`"
        return f"{error.option_name}: no such option of `{command}`; allowed: {close}"
    if isinstance(error, click.BadOptionUsage):
        problem = "needs a value" if "requires an argument" in error.message else error.message.rstrip(".")
        return f"{error.option_name}: {problem}; allowed: see `{command} --help`"
    if isinstance(error, click.BadParameter) and error.param is not None:
        param = error.param
        name = max(param.opts, key=len) if isinstance(param, click.Option) else param.human_readable_name
        if isinstance(error, click.MissingParameter):
            return f"{name}: missing; allowed: {(param.help or 'see `' + command + ' --help`').rstrip('.')}"
        message = error.message.rstrip(".")
        if "; allowed:" not in message:
            message += f"; allowed: {_allowed(param)}"
        return f"{name}: {message}"
    if ctx is not None and isinstance(ctx.command, click.Group) and "No such command" in error.message:
        return f"COMMAND: {error.message.rstrip('.').lower()}; allowed: {', '.join(sorted(ctx.command.commands))}"
    return f"{command}: {error.message.rstrip('.')}; allowed: see `{command} --help`"


def _allowed(param: click.Parameter) -> str:
    kind = param.type
    if isinstance(kind, _Number):
        return kind.bounds.describe(kind.kind)
    if isinstance(kind, click.Choice):
        return ", ".join(map(str, kind.choices))
    if isinstance(kind, click.Path):
        return "an existing file" if kind.exists and not kind.dir_okay else "a path"
    return {"integer": "an integer", "float": "a number", "boolean": "true or false"}.get(kind.name, f"a {kind.name}")


_SHOWS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2; older versions exit instead


class _Group(click.Group):
    """Turns lmshrink's own errors and click's usage errors into one line on stderr and exit status 2."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except _SHOWS_HELP:  # `lmshrink` alone prints the help, as click does
            raise
        except click.UsageError as error:
            _quiet_unless_rank0()  # torchrun gave every process the same command line: rank 0 says what is wrong
            raise _OneLineError(_usage_line(error)) from error

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LmshrinkError as error:
            if getattr(error, "agreed", False) or not (isinstance(error, DistributedError) or _joined()):
                # Every process of the run knows this error (agreed, or found from the command line that torchrun
                # gave all of them before they met): rank 0 reports it.
                _quiet_unless_rank0()
            rank = _launched_rank()
            if rank is not None:  # reported: torchrun stopping this process now (SIGTERM) needs no second message
                import signal

                signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(_OneLineError.exit_code))
            raise _OneLineError(str(error) if not rank else f"rank {rank}: {error}") from error
        except _SHOWS_HELP:  # `lmshrink` alone prints the help, as click does
            raise
        except click.UsageError as error:
            _quiet_unless_rank0()
            raise _OneLineError(_usage_line(error)) from error


def _launched_rank() -> int | None:
    from lmshrink.distributed import launched_rank

    return launched_rank()


def _joined() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _quiet_unless_rank0() -> None:
    """A process other than rank 0 of a distributed run ends silently with status 0 on an error rank 0 reports too:
    rank 0's status is the run's (a worker failing first would make torchrun stop rank 0 before it says why)."""
    if _launched_rank():
        sys.exit(0)


class _Number(click.ParamType):
    """An int or a finite float inside ``bounds`` (lmshrink.bounds), checked before the command runs."""

    def __init__(self, kind: type, bounds: Bounds):
        self.kind, self.bounds = kind, bounds
        self.name = "integer" if kind is int else "float"

    def convert(self, value, param, ctx):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            try:
                value = self.kind(str(value).strip())
            except ValueError:
                self.fail(f"{value!r} is not {'an integer' if self.kind is int else 'a number'}; "
                          f"allowed: {self.bounds.describe(self.kind)}", param, ctx)
        try:
            return self.bounds.check(max(param.opts, key=len) if param is not None else "value", value, self.kind)
        except InvalidArgument as error:
            self.fail(f"{error.problem}; allowed: {error.allowed}", param, ctx)

    def get_metavar(self, param, ctx=None):
        return "INTEGER" if self.kind is int else "FLOAT"


def _integer(low, high=None):
    return _Number(int, Bounds(low, high))


MAX_THREADS = min(1024, 4 * (os.cpu_count() or 1))
MAX_TOKENS = 100_000_000  # evaluation tokens; more than any test set lmshrink reads
MAX_WINDOW = 1 << 20


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
             help="Shrink language models with low-rank and tensor decompositions, and measure what it cost.\n\n"
                  f"MODEL is a built-in name ({', '.join(BUILTINS)}), a Hugging Face directory, a .gguf file, or a directory "
                  f"saved by lmshrink. DATA is {DATA_CHOICES} ('wikitext-2' and 'ptb' from the shared data folder, "
                  "LMSHRINK_DATA; 'pydoc' and 'stdlib' from Python itself).")
@click.version_option(package_name="lmshrink")
@click.option("--threads", type=_integer(1, MAX_THREADS), default=None, help=f"CPU threads for torch, 1..{MAX_THREADS} (default: torch's choice).")
def main(threads):
    if threads:
        torch.set_num_threads(threads)


def _method_options(command):
    """Add every registered method's own options (e.g. --groups, --bits) to the compress command.

    Methods may share an option name with their own defaults and ranges (--bits: groupreduce 0, quantize 8): the flag
    has no default of its own, its help names each method's, and the chosen method's resolve_options fills and checks it.
    """
    from lmshrink.methods import all_methods

    by_name: dict[str, list] = {}
    for method in all_methods().values():
        for option in method.options:
            by_name.setdefault(option.name, []).append((method.name, option))
    for name in sorted(by_name, reverse=True):
        owners = by_name[name]
        first = owners[0][1]
        flag = name.replace("_", "-")

        def same(attribute):
            return all(getattr(o, attribute) == getattr(first, attribute) for _, o in owners)

        if first.type is bool and same("type"):
            kind = None
        elif first.choices and same("choices"):
            kind = click.Choice([str(c) for c in first.choices])
        elif first.type in (int, float) and same("type"):
            kind = _Number(first.type, (first.bounds or Bounds()) if same("bounds") else Bounds())
        else:
            kind = first.type if same("type") else str
        described = []
        for method_name, option in owners:
            allowed = f"; {option.bounds.describe(option.type)}" if option.bounds is not None else ""
            described.append(f"{method_name}: {option.help} [default: {option.default}{allowed}]")
        help_text = "; ".join(described)
        if kind is None:
            command = click.option(f"--{flag}/--no-{flag}", name, default=None, help=help_text)(command)
        else:
            command = click.option(f"--{flag}", name, type=kind, default=None, help=help_text)(command)
    return command


def _method_help() -> str:
    from lmshrink.methods import all_methods

    return "; ".join(f"{m.name}: {m.summary}" for m in all_methods().values())


def _check_window_and_data(tokens: int, window: int, data: str | None) -> None:
    """Checks of --tokens, --window and --data that need no model, before any work."""
    if window > tokens:
        raise InvalidArgument("--window", f"{window} tokens is longer than --tokens {tokens}",
                              f"a --window of at most --tokens ({tokens}), or more --tokens")
    if data is not None:
        path = Path(data).expanduser()
        if not str(data).strip():
            raise InvalidArgument("--data", "is empty", DATA_CHOICES)
        if path.exists() and not (path.is_file() or path.is_dir()):
            raise InvalidArgument("--data", f"{data!r} is not a regular file or folder (a device, pipe or socket)",
                                  DATA_CHOICES)


def _json_line(result: dict) -> str:
    """``result`` as strict JSON: a NaN or inf figure becomes null, and a note says which."""
    nulls = []

    def clean(value, where):
        if isinstance(value, float) and not math.isfinite(value):
            nulls.append(f"{where} ({value})")
            return None
        if isinstance(value, dict):
            return {key: clean(item, f"{where}.{key}" if where else str(key)) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(item, f"{where}[{i}]") for i, item in enumerate(value)]
        return value

    cleaned = clean(result, "")
    if nulls:
        cleaned["notes"] = [*(cleaned.get("notes") or []), f"not finite, reported as null: {', '.join(nulls)}"]
    return json.dumps(cleaned, allow_nan=False)


@contextlib.contextmanager
def _stdout_kept_for_json():
    """While a --json command runs, anything else written to stdout (a library's notice or prompt) goes to stderr;
    yields the real stdout, for the one JSON line."""
    sys.stdout.flush()
    try:
        stdout_fd, stderr_fd = sys.stdout.fileno(), sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # not real files (e.g. click's test runner): Python-level only
        real = sys.stdout
        with contextlib.redirect_stdout(sys.stderr):
            yield real
        return
    saved = os.dup(stdout_fd)
    os.dup2(stderr_fd, stdout_fd)
    real = os.fdopen(saved, "w", encoding="utf-8")
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield real
    finally:
        sys.stdout.flush()
        real.flush()
        os.dup2(saved, stdout_fd)
        real.close()


def _print_table(title: str, rows: list[list], headers: list[str]):
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for header in headers:
        # Long names fold onto another line; numbers are never cut ("0.9…" says nothing).
        left = header in ("", "module", "status", "layer")
        table.add_column(header, justify="left" if left else "right", overflow="fold" if left else "ellipsis", no_wrap=not left)
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
    click.option("--data", "data", default=None, help="Evaluation/calibration text (see above); TEXT+self calibrates half on TEXT, half on text the model samples itself. "
                                            "Default: WikiText-2 from the shared data folder if present, else 'pydoc' (Python's reference manual)."),
    click.option("--tokens", type=_integer(2, MAX_TOKENS), default=8192, show_default=True, help="Evaluation tokens (first N of the test text)."),
    click.option("--window", type=_integer(2, MAX_WINDOW), default=512, show_default=True,
                 help="Window length in tokens (perplexity and calibration); at most --tokens and the model's positions."),
    click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout instead of tables."),
]


device_options = [
    click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
                 help="Where the model runs (auto: CUDA when present). Default: the CPU; --sequential: auto."),
    click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default=None,
                 help="The dtype weights are held (and saved) in; the factorization math runs in float32. auto: what the "
                      "checkpoint declares (a GGUF: bfloat16). Default: as loaded (float32; a saved directory: its dtype); "
                      "--sequential: auto."),
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
@click.option("--ratio", type=_Number(float, Bounds(0, 1, low_open=True)), default=None, help="Each targeted matrix keeps R times its dense parameter count (0 < R <= 1). Default 0.8 when no --rank/--energy/--params.")
@click.option("--rank", type=_integer(1), default=None, help="The same rank K for every targeted matrix (1 <= K <= min(m, n)).")
@click.option("--energy", type=_Number(float, Bounds(0, 1, low_open=True)), default=None, help="Smallest rank keeping E of each matrix's squared singular values (0 < E <= 1).")
@click.option("--params", type=_integer(1), default=None,
              help="Budget: the targeted matrices keep at most N parameters in all (the global ratio N / their dense count; "
                   "with --allocation sensitivity, spent where it costs least).")
@click.option("--targets", multiple=True, default=("linears",), show_default=True,
              help="Modules to compress: linears, attention, mlp, embedding, lm_head (word-level LSTMs: W_i, W_h, lstm = both), or a glob on module names (repeatable).")
@click.option("--multiple-of", type=_integer(1, 65536), default=1, show_default=True, help="Round ranks down to a multiple of this.")
@click.option("--allocation", default="uniform", show_default=True, help="Rank allocation across targets: uniform (the same ratio everywhere) or sensitivity (the same budget, spent where calibration says it costs least).")
@click.option("--max-shift", type=_Number(float, Bounds(0, 100)), default=0.25, show_default=True,
              help="--allocation sensitivity: each rank stays within +-this fraction of its uniform rank (0: uniform).")
@click.option("--calibration-windows", type=_integer(1, 65536), default=32, show_default=True, help="Calibration windows from the train text (methods that calibrate).")
@click.option("--self-share", type=click.FloatRange(0, 1), default=None,
              help="Share of the calibration windows sampled from the model itself, the rest from --data's text (default: "
                   "what --data says: TEXT+self half, else none; a recipe stage may set its own).")
@click.option("--joint", is_flag=True,
              help="Factorize the linears that read one input (q/k/v; gate/up) together: one right factor shared by them, "
                   "so a rank costs in + their outs summed instead of in + out for each (low-rank methods; not with --bits).")
@click.option("--untie-head", is_flag=True,
              help="A token embedding tied to the output layer: compress the input side only, the output layer keeps the "
                   "original table (the model grows by V x d; for analysis).")
@click.option("--finetune-steps", type=_integer(0, 1_000_000), default=0, show_default=True,
              help="After compressing, train the factors for this many steps of one window of train text (causal LMs; refinement training).")
@click.option("--finetune-lr", type=_Number(float, Bounds(0, 1, low_open=True)), default=1e-4, show_default=True, help="AdamW learning rate of --finetune-steps.")
@click.option("--finetune-distill", is_flag=True,
              help="Train toward the uncompressed model's next-token distributions (KL) instead of the text's tokens; keeps a copy of the original in memory.")
@click.option("--recipe", default=None,
              help="Whole-model recipe instead of --method/--ratio: a YAML/JSON file of stages, a built-in (half, quarter, channels; "
                   "see `lmshrink methods`), or a directory saved by lmshrink (reuses its recipe).")
@click.option("--out", default=None, help="Where to save the compressed model (a new or empty directory). Default ./compressed/<model>-<method>.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it holds an earlier lmshrink save (atomically: it is never missing).")
@click.option("--no-save", is_flag=True, help="Measure only; do not save.")
@click.option("--sequential", is_flag=True,
              help="Block by block: one decoder block in memory at a time, read from the checkpoint and written as sharded "
                   "safetensors (Hugging Face causal decoders such as LLaMA and Gemma 3; low-rank methods; targets in the blocks).")
@_with(device_options)
@click.option("--calibrate-on", type=click.Choice(["compressed", "original"]), default=None,
              help="Compress with the block engine, each block calibrated on what the compressed blocks before it produce "
                   "(compressed, the default with --sequential: closed loop) or on the original model's activations "
                   "(original). Without --sequential the rest of the run is the whole-model one's.")
@click.option("--refit", is_flag=True,
              help="Compress with the block engine (closed loop) and, after each block is factorized, refit its factors so "
                   "the block reproduces the original model's outputs on the compressed inputs (error compensation; one more "
                   "pass over the windows per block). Without --sequential the rest of the run is the whole-model one's.")
@_with(common_eval)
@_method_options
def compress(model, method, ratio, rank, energy, params, targets, multiple_of, allocation, max_shift, calibration_windows, self_share, joint, untie_head, finetune_steps,
             finetune_lr, finetune_distill, recipe, out, overwrite, no_save, sequential, device, dtype, calibrate_on, refit, data, tokens, window,
             as_json, **method_options):
    """Compress MODEL and report params, bytes, perplexity and tokens/s before and after.

    With no arguments: SmolLM2-135M, the default method, --ratio 0.8, the default text.
    """
    import lmshrink
    from lmshrink.methods import get_method
    from lmshrink.pipeline import EvalOptions, FinetuneOptions, check_options, run
    from lmshrink.progress import Stages

    ctx = click.get_current_context()
    json_out = ctx.with_resource(_stdout_kept_for_json()) if as_json else None
    given = {k: v for k, v in method_options.items() if v is not None}
    # --bits / --quant-group are Plan.bits / Plan.group_size for every method: the factors (or, with quantize, the
    # dense matrices) are stored at B bits.
    bits, group_size = given.pop("bits", None) or None, given.pop("quant_group", None) or None
    recipe_spec = None
    if recipe is not None:
        from lmshrink.recipes import load_recipe

        typed = [name for name in ("targets", "allocation", "max_shift", "multiple_of", "joint", "untie_head") if _typed(ctx, name)]
        clashing = [flag for flag, value in (("--ratio", ratio), ("--rank", rank), ("--energy", energy), ("--params", params),
                                             ("--bits", bits)) if value] + [f"--{k.replace('_', '-')}" for k in [*given, *typed]]
        if clashing:
            raise InvalidArgument("--recipe", f"given with {', '.join(clashing)}", "the recipe's stages say what, how much and "
                                  "how; either --recipe (with --calibration-windows / --window / --self-share for every stage) or --method")
        recipe_spec = load_recipe(recipe)
        # Typed calibration settings apply to every stage (recorded in the manifest as run), never silently dropped.
        overrides = {name: value for name, value in (("calibration_windows", calibration_windows), ("window", window),
                                                     ("self_share", self_share)) if _typed(ctx, name)}
        if overrides:
            recipe_spec = dataclasses.replace(recipe_spec, stages=[dataclasses.replace(stage, **overrides) for stage in recipe_spec.stages])
        method = f"recipe-{recipe_spec.name or 'file'}"
        ratio = 1.0
    if ratio is None and rank is None and energy is None and params is None:
        ratio = DEFAULT_RATIO
    method_spec = get_method(DEFAULT_METHOD if recipe_spec else method)
    foreign = sorted(set(given) - {o.name for o in method_spec.options})
    if foreign:
        raise lmshrink.errors.InvalidArgument(", ".join(f"--{f.replace('_', '-')}" for f in foreign),
                                              f"not an option of method {method!r}",
                                              ", ".join(f"--{o.name.replace('_', '-')}" for o in method_spec.options) or "none")
    plan = lmshrink.Plan(method=method, targets=targets, ratio=ratio, rank=rank, energy=energy, params=params, multiple_of=multiple_of,
                         allocation=allocation, max_shift=max_shift, options=given, calibration_windows=calibration_windows, self_share=self_share,
                         window=window, untie_head=untie_head, bits=bits, group_size=group_size, joint=joint)
    _check_window_and_data(tokens, window, data)
    finetune = FinetuneOptions(finetune_steps, finetune_lr, finetune_distill) if finetune_steps else None
    check_options(list(recipe_spec.stages) if recipe_spec else [plan], sequential=sequential, calibrate_on=calibrate_on,
                  saving=not no_save, finetune=finetune, refit=refit, recipe=recipe_spec is not None)
    if device is not None or dtype is not None:
        _check_device_and_dtype(device, dtype)
    world = _join_run(ctx, sequential, device, finetune, calibrate_on, refit)  # distributed.SINGLE unless torchrun started several
    output, failure = None, None
    out = Path("compressed") / f"{Path(str(model)).stem}-{method}" if out is None else out
    try:
        if not no_save and world.main:  # checked and locked before any work; held until the command ends
            from lmshrink.outputs import reserve

            output = ctx.with_resource(reserve(out, overwrite=overwrite, inputs=[model]))
        corpus = lmshrink.load_corpus(data)
    except LmshrinkError as error:
        failure = error
    from lmshrink.distributed import agree

    agree(world, _run_fingerprint(ctx), failure)  # one process: raises ``failure``; several: the same options everywhere
    stages = Stages(enabled=not as_json and world.main)
    stages.note(f"text: {corpus.source}" + (f" ({world.size} processes)" if world.distributed else ""))
    target = output.target if output is not None else (Path(out).expanduser().absolute() if not no_save else None)
    result = run(model, recipe_spec or plan, corpus, sequential=sequential, device=device or ("auto" if sequential else None), dtype=dtype,
                 calibrate_on=calibrate_on, refit=refit, evaluate=EvalOptions(tokens, window), finetune=finetune, out=target,
                 overwrite=overwrite, on_stage=stages, world=world)
    if not world.main:
        return  # rank 0 prints and has written the output
    if as_json:
        click.echo(_json_line(result.to_dict()), file=json_out)
    elif sequential:
        _print_block_by_block(result.to_dict())
    else:
        _print_whole_model(result, targets, allocation, recipe_spec)


def _typed(ctx: click.Context, name: str) -> bool:
    """Whether the user gave option ``name`` (on the command line or in its environment variable), not its default."""
    return ctx.get_parameter_source(name) in (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)


def _check_device_and_dtype(device, dtype) -> None:
    """--device / --dtype checked before any work: CUDA asked on a machine without it, a dtype the device cannot run."""
    from lmshrink.devices import DTYPES, check_runs, resolve_device

    found = resolve_device(device or "cpu")
    if dtype in DTYPES:
        check_runs(DTYPES[dtype], found)


def _print_whole_model(result, targets, allocation, recipe=None) -> None:
    from lmshrink.evaluate import NOISY_SPREAD, speed_label
    from lmshrink.pipeline import SAMPLE_PROMPT, SAMPLE_TOKENS

    before, after, speed, on_disk, samples = result.before, result.after, result.speed, result.on_disk, result.samples
    causal = result.loaded.causal
    factorized = sum(1 for m in result.modules if m["status"] == "factorized")
    amounts = ", ".join(plan.amount() for plan in result.plans)
    if recipe is not None:
        click.echo(f"model: {result.model}   {recipe.describe()}")
        budget = (result.recipe or {}).get("budget")
        if budget:
            click.echo(f"budget: {budget['limit']:,} {budget['unit']}; predicted {budget['predicted']:,}, measured {budget['measured']:,}"
                       f" ({'met' if budget['met'] else 'MISSED'}); stages as run: "
                       + "; ".join(f"{s['method']} {s.get('ratio', s.get('rank'))}" for s in result.recipe["applied"]))
    else:
        click.echo(f"model: {result.model}   method: {result.method} ({amounts}, targets {', '.join(targets)}, allocation {allocation})")
    engine = result.reports[0].plan
    if engine.get("executor") == "sequential":
        click.echo(f"compressed by the block engine: {engine['calibrate_on']} activations{', refit' if engine.get('refit') else ''}")
    click.echo(f"data: {result.data}")
    click.echo(f"{factorized} of {len(result.modules)} targeted matrices factorized in {result.compression_seconds:.1f} s"
               + (f"; {len(result.modules) - factorized} stay dense (factorized form not smaller)" if factorized < len(result.modules) else ""))
    rows = [["params", before["params"], after["params"], after["params"] / before["params"]],
            ["bytes in memory", before["bytes"], after["bytes"], after["bytes"] / before["bytes"]]]
    if on_disk["source"] is not None or on_disk["saved"] is not None:
        ratio = on_disk["saved"] / on_disk["source"] if on_disk["source"] and on_disk["saved"] else None
        rows.append(["bytes on disk", on_disk["source"], on_disk["saved"], ratio])
    if causal:
        rows.append(["perplexity", before["perplexity"], after["perplexity"], after["perplexity"] / before["perplexity"]])
    else:
        rows.append(["embedding cosine vs original", 1.0, after["fidelity"]["cosine_mean"], after["fidelity"]["cosine_mean"]])
    rows.append(["tokens/s", speed_label(**_speed_args(speed["before"])), speed_label(**_speed_args(speed["after"])),
                 f"{speed['speedup']:.2f}" + (", noisy" if speed["noisy"] else "")])
    tuned, window = result.finetune, result.window
    if tuned:
        click.echo(f"refinement training: {tuned['steps']} steps x {window} tokens in {tuned['seconds']:.0f} s, "
                   f"{tuned['loss']} loss {tuned['first_loss']:.3f} -> {tuned['last_loss']:.3f}")
    _print_table("before / after", rows, ["", "before", "after", "after/before"])
    click.echo("bytes in memory: the weights as loaded (the source may be stored smaller, e.g. quantized)")
    saved = result.saved_to
    if on_disk["source"] is not None or on_disk["saved"] is not None:
        click.echo(f"bytes on disk: before, the {_disk_label(on_disk['source_path'])} the model came from ({on_disk['source_path'] or '-'}); "
                   f"after, the saved directory ({saved or 'not saved'})")
    if causal:
        click.echo(f"perplexity: {after['perplexity_protocol']}")
    click.echo(f"tokens/s: forward pass of 256 tokens, median ± half the range of the repeats; {speed['method']}"
               + (f"; the repeats disagree by more than ±{100 * NOISY_SPREAD:.0f}% (the speed-up by ±{100 * speed['speedup_spread']:.0f}%), "
                  "so treat these figures as rough" if speed["noisy"] else ""))
    if samples is not None:
        click.echo(f"greedy sample, {SAMPLE_TOKENS} new tokens after {SAMPLE_PROMPT!r}:")
        click.echo(f"  original:   {samples['before']}")
        click.echo(f"  compressed: {samples['after']}")
    for note in result.notes:
        click.echo(f"note: {note}")
    click.echo(f"saved to: {saved}" if saved else "not saved (--no-save)")


def _join_run(ctx, sequential: bool, device, finetune, calibrate_on, refit):
    """This process's lmshrink.distributed.World: SINGLE, or its place among the processes torchrun started."""
    from lmshrink import distributed
    from lmshrink.pipeline import check_distributed_whole_model

    if not (distributed.launched() or distributed.current_world().distributed):
        return distributed.SINGLE
    if not sequential:
        check_distributed_whole_model(os.environ.get("WORLD_SIZE", "several"), finetune, calibrate_on, refit)
    # Block by block the device defaults to auto, whole-model to the CPU (lmshrink.pipeline.run).
    device_type = "cuda" if device == "cuda" or ((device == "auto" or (device is None and sequential)) and torch.cuda.is_available()) else "cpu"
    try:
        world = distributed.init_world(device_type)
    except InvalidArgument as error:
        error.agreed = True  # every process of a node checks the same GPUs
        raise
    ctx.call_on_close(lambda: distributed.finish(world))
    if world.main:
        import signal

        def stopped(signum, frame):
            # torchrun stops every process (SIGTERM) as soon as one fails; the staged output is already removed
            # when this runs (lmshrink.outputs turns the signal into an interrupt first and re-raises it after).
            sys.stderr.write(f"error: torchrun: the run was stopped ({signal.Signals(signum).name}): another of its {world.size} "
                             "processes failed or the run was interrupted (torchrun's report names the rank); nothing was written\n")
            sys.stderr.flush()
            os._exit(128 + signum)

        signal.signal(signal.SIGTERM, stopped)
    return world


def _run_fingerprint(ctx) -> dict:
    """What every process of a distributed run must share: lmshrink's version and every option of the command."""
    import lmshrink

    return {"lmshrink": lmshrink.__version__, "command": ctx.info_name,
            "options": json.loads(json.dumps(ctx.params, sort_keys=True, default=str))}


def _print_block_by_block(result: dict) -> None:
    from lmshrink.pipeline import SAMPLE_PROMPT

    plan = result["plan"]
    click.echo(f"model: {result['model']}   method: {result['method']} (block by block, {plan['calibrate_on']} activations"
               f"{', refit' if plan.get('refit') else ''}, "
               f"{plan['dtype']} on {plan['device']})")
    click.echo(f"data: {result['data']}")
    factorized = sum(1 for m in result["modules"] if m["status"] == "factorized")
    click.echo(f"{factorized} of {len(result['modules'])} targeted matrices factorized in {result['compression_seconds']:.1f} s")
    disk = result["on_disk"]
    _print_table("before / after", [
        ["params", result["params"]["before"], result["params"]["after"], result["params"]["after"] / result["params"]["before"]],
        ["bytes on disk", disk["source"], disk["saved"], disk["saved"] / disk["source"] if disk["source"] else None],
        ["perplexity", None, result["perplexity"]["after"], None]], ["", "before", "after", "after/before"])
    click.echo(f"perplexity: {result['perplexity_protocol']}; the original is not evaluated block by block "
               f"(`lmshrink eval {result['model']}` measures it)")
    click.echo(f"greedy sample after {SAMPLE_PROMPT!r}: {result['samples']['after']}")
    for note in result["notes"]:
        click.echo(f"note: {note}")
    click.echo(f"saved to: {result['saved_to']}")


def _speed_args(measured: dict) -> dict:
    return {"tokens_per_s": measured["tokens_per_s"], "spread": measured["spread"], "noisy": measured["noisy"]}


def _disk_label(path) -> str:
    if path is None:
        return "-"
    path = Path(path)
    return f"{path.suffix[1:].upper()} file" if path.is_file() and path.suffix else "file" if path.is_file() else "directory"


@main.command("eval")
@click.argument("model")
@click.option("--reference", default=None, help="Original model to measure fidelity against (encoders).")
@click.option("--tasks", default=None, help="lm-evaluation-harness tasks to run too, comma-separated (causal LMs; needs lm-eval: pip install 'lmshrink[eval]').")
@click.option("--include-path", type=click.Path(), default=None, help="A folder of extra lm-eval task YAML files (as lm-eval's --include_path).")
@click.option("--limit", type=click.FloatRange(min=0, min_open=True), default=None,
              help="lm-eval tasks: at most N documents per task (N >= 1), or that fraction of each task (N < 1).")
@_with(common_eval)
@_with(device_options)
def eval_command(model, reference, tasks, include_path, limit, data, tokens, window, as_json, device, dtype):
    """Measure MODEL_OR_DIR: params, bytes, perplexity (causal LMs), fidelity (encoders, with --reference), tokens/s;
    with --tasks, lm-eval accuracies with their standard errors."""
    import lmshrink
    from lmshrink.evaluate import pooled_embeddings
    from lmshrink.pipeline import check_positions, eval_summary, fidelity_sentences

    json_out = click.get_current_context().with_resource(_stdout_kept_for_json()) if as_json else None
    progress = not as_json and sys.stderr.isatty()
    _check_window_and_data(tokens, window, data)
    if device is not None or dtype is not None:
        _check_device_and_dtype(device, dtype)
    if tasks and lmshrink.pipeline.declares_causal(model) is False:  # told from its config: refused before loading anything
        raise InvalidArgument("--tasks", f"{str(model)!r} is an encoder", "a causal language model (lm-eval scores next-token log-likelihoods)")
    task_names, task_manager = _lm_eval_tasks(tasks, include_path, limit)  # bad task names fail before any measuring
    corpus = lmshrink.load_corpus(data)
    loaded = lmshrink.load_model(model, device=device, dtype=dtype)
    if task_names and not loaded.causal:  # a model whose kind its config did not tell: refused before measuring
        raise InvalidArgument("--tasks", f"{str(model)!r} is an encoder", "a causal language model (lm-eval scores next-token log-likelihoods)")
    check_positions(loaded, window)
    texts = ref = None
    if reference is not None and not loaded.causal:
        texts = fidelity_sentences(corpus)
        ref = pooled_embeddings(lmshrink.load_model(reference, device=device, dtype=dtype), texts).to(loaded.device)
    summary = eval_summary(loaded, corpus, tokens, window, progress, texts, ref)
    summary.update(model=str(model), data=corpus.source, window=window)
    if task_names:
        from lmshrink.lm_eval_model import evaluate_tasks

        summary["tasks"] = evaluate_tasks(loaded, task_names, task_manager, limit=int(limit) if limit and limit >= 1 else limit)
    if as_json:
        click.echo(_json_line(summary), file=json_out)
        return
    from lmshrink.evaluate import speed_label

    rows = [["params", summary["params"]], ["bytes in memory", summary["bytes"]]]
    if summary["perplexity"] is not None:
        rows.append([f"perplexity ({summary['eval_tokens']:,} tokens, window {window})", summary["perplexity"]])
    if summary.get("fidelity"):
        rows.append(["embedding cosine vs reference", summary["fidelity"]["cosine_mean"]])
    rows.append(["tokens/s (forward, 256 tokens)", speed_label(**_speed_args(summary["speed"]))])
    click.echo(f"data: {corpus.source}")
    _print_table(str(model), rows, ["", "value"])
    if summary["perplexity"] is not None:
        click.echo(f"perplexity: {summary['perplexity_protocol']}")
    click.echo(f"tokens/s: {summary['speed']['method']}")
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
@click.option("--calibration-windows", type=_integer(1, 65536), default=16, show_default=True, help="Calibration windows (with --data).")
@click.option("--window", type=_integer(2, MAX_WINDOW), default=512, show_default=True, help="Calibration window length (with --data).")
@_with(device_options)
def inspect(model, targets, as_json, data, calibration_windows, window, device, dtype):
    """Per matrix: shape, params, effective rank, the energy kept at a few ratios; with --data, the SVD-risk."""
    import lmshrink
    from lmshrink.analysis import inspect_model
    from lmshrink.pipeline import check_positions

    json_out = click.get_current_context().with_resource(_stdout_kept_for_json()) if as_json else None
    if device is not None or dtype is not None:
        _check_device_and_dtype(device, dtype)
    loaded = lmshrink.load_model(model, device=device, dtype=dtype)
    if data is not None:
        check_positions(loaded, window)
    rows = inspect_model(loaded, targets, progress=not as_json and sys.stderr.isatty())
    risk = None
    dense = [r for r in rows if r["layer"] == "dense"]
    if data is not None and dense:  # the SVD-risk is a property of dense matrices
        from lmshrink.analysis.svd_risk import add_risk_columns

        chosen = [t for t in loaded.candidates() if t.name in {r["name"] for r in dense}]
        risk = add_risk_columns(loaded, chosen, dense, lmshrink.load_corpus(data), calibration_windows, window,
                                progress=not as_json and sys.stderr.isatty())
    if as_json:
        click.echo(_json_line({"model": str(model), "matrices": rows, **({"svd_risk": risk} if risk else {})}), file=json_out)
        return
    if risk:
        click.echo(f"SVD-risk at ratio {risk['ratio']:g} (predicted loss increase of plain SVD, nats): "
                   f"{risk['total_svd_risk']:.4g} for the model")
    extra = [k for k in rows[0] if k.startswith(("energy@", "svd_risk@", "fisher_gap@")) or k in ("l1", "nuclear", "row_l1_std")]
    extra = [k for k in extra if any(k in r for r in rows)]
    headers = ["module", "layer", "shape", "params", "rank", "eff. rank", *extra]
    table = [[r["name"], r["layer"] if r["layer"] != "dense" else r["kind"], "x".join(map(str, r["shape"])), r["params"],
              _rank_text(r["rank"]), r.get("effective_rank"), *[r.get(k) for k in extra]] for r in rows]
    shown, left_out = _fit_columns(headers, table)
    factorized = sum(r["layer"] != "dense" for r in rows)
    _print_table(f"{model}: {len(rows)} targets, {factorized} factorized", [[row[i] for i in shown] for row in table],
                 [headers[i] for i in shown])
    if left_out:
        import textwrap

        click.echo(textwrap.fill(f"left out to fit {_console_width()} columns: {', '.join(left_out)} (see --json, or a wider terminal)",
                                 _console_width()))


def _rank_text(rank) -> str | None:
    if isinstance(rank, list):
        return "/".join(map(str, rank))
    return rank


def _console_width() -> int:
    from rich.console import Console

    return Console().width


def _fit_columns(headers: list[str], table: list[list]) -> tuple[list[int], list[str]]:
    """The columns (indices, in order) that fit the console without cutting a cell, and the headers left out.

    Columns are kept from the left; the first (module names) may fold onto two lines, every other cell is kept
    whole, so a narrow terminal loses trailing columns rather than showing truncated numbers.
    """
    width = _console_width()
    needed = [max([len(headers[i])] + [len(_fmt(row[i])) for row in table]) for i in range(len(headers))]
    needed[0] = min(needed[0], 20)  # module names fold
    shown, used = [], 4  # the table's outer border
    for index, size in enumerate(needed):
        if used + size + 3 > width:
            break
        shown.append(index)
        used += size + 3
    return shown, [headers[i] for i in range(len(headers)) if i not in shown]


@main.command()
def methods():
    """List the compression methods with their options, and the rank allocations."""
    from lmshrink.allocation import ALLOCATIONS
    from lmshrink.methods import all_methods

    click.echo("methods (--method):")
    for method in all_methods().values():
        optional = sorted({stat for stat, _ in method.needs_when} - method.needs)
        extra = (f" (calibrates: {', '.join(sorted(method.needs))}" + (f"; {', '.join(optional)} with some options" if optional else "")
                 + ")") if method.needs else ""
        click.echo(f"{method.name:12s} {method.summary}{extra}")
        for option in method.options:
            click.echo(f"{'':14s}--{option.name.replace('_', '-')}: {option.help} [default: {option.default}]")
    click.echo("\nallocations (--allocation):")
    for name, function in ALLOCATIONS.items():
        click.echo(f"{name:12s} {(function.__doc__ or '').strip().splitlines()[0]}")
    from lmshrink.recipes import builtin_recipes

    click.echo("\nrecipes (compress --recipe NAME | FILE.yaml | SAVED_DIR; compare --recipes):")
    for name, description in builtin_recipes().items():
        click.echo(f"{name:12s} {description}")
    click.echo(f"{'':14s}--bits B on any method: factors stored as B-bit integers (2, 3, 4, 5, 6, 8; --quant-group: columns per scale)")


@main.command("compare")
@click.argument("model")
@click.argument("recipe_list", nargs=-1, metavar="[RECIPE]...")
@click.option("--recipes", "recipes_flag", is_flag=True,
              help="Marks the recipes that follow (built-in names, YAML/JSON files, saved directories): "
                   "`lmshrink compare MODEL --recipes half quarter my.yaml`.")
@click.option("--quant-bits", default="8,4", show_default=True,
              help="Widths of 'quantization alone' (every linear, embedding and head; quantize method) plotted beside, comma-separated; '' for none.")
@click.option("--quant-group", type=_integer(0, 1 << 20), default=0, show_default=True, help="Columns per scale of 'quantization alone' (0: per row).")
@click.option("--out", default=None, help="A new or empty directory for frontier.md, frontier.json and frontier.png. Default ./compare/<model>.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it holds an earlier output of this command.")
@_with(common_eval)
def compare(model, recipe_list, recipes_flag, quant_bits, quant_group, out, overwrite, data, tokens, window, as_json):
    """Run several recipes on MODEL and write the size/quality frontier: a table (markdown + JSON) and a PNG of
    perplexity against whole-model bytes, with the original and quantization alone on the same plot."""
    from lmshrink.decompose.quantize import check_bits
    from lmshrink.frontier import compare_recipes, markdown_table, write_comparison
    from lmshrink.outputs import reserve
    from lmshrink.progress import Stages
    from lmshrink.pipeline import check_positions, load_with_stages
    from lmshrink.recipes import load_recipe

    import lmshrink

    ctx = click.get_current_context()
    json_out = ctx.with_resource(_stdout_kept_for_json()) if as_json else None
    if not recipe_list:
        raise InvalidArgument("--recipes", "no recipe given", "one or more recipes: built-in names, YAML/JSON files or saved directories")
    try:
        widths = [check_bits(int(part), "--quant-bits") for part in quant_bits.split(",") if part.strip()]
    except ValueError:
        raise InvalidArgument("--quant-bits", f"{quant_bits!r} is not a comma-separated list of integers", "e.g. 8,4") from None
    for spec in recipe_list:
        load_recipe(spec)  # a missing file or a bad key fails before the model is loaded
    _check_window_and_data(tokens, window, data)
    output = ctx.with_resource(reserve(Path("compare") / Path(str(model)).stem if out is None else out,
                                       overwrite=overwrite, inputs=[model]))
    corpus = lmshrink.load_corpus(data)
    stages = Stages(enabled=not as_json)
    stages.note(f"text: {corpus.source}")
    loaded, _ = load_with_stages(model, stages)
    check_positions(loaded, window)
    result = compare_recipes(loaded, list(recipe_list), corpus, tokens=tokens, window=window, quant_bits=widths,
                             quant_group=quant_group or None, progress=stages.bars, on_stage=stages.note)
    with output.staging() as staging:
        write_comparison(result, staging)
    result["written"] = [str(output.target / f"frontier.{ext}") for ext in ("md", "json", "png")]
    if as_json:
        click.echo(_json_line(result), file=json_out)
        return
    click.echo(markdown_table(result))
    click.echo("written: " + ", ".join(result["written"]))


@main.group("cache")
def cache_group():
    """What lmshrink keeps in its cache ($LMSHRINK_CACHE, default ~/.cache/lmshrink): list it, clear it.

    models/: built-in models fetched from the package index; stats/: calibration statistics; word-lstm/: the
    reference LSTMs of `lmshrink train-lm` (minutes to train again).
    """


CACHE_PARTS = {"models": "built-in models (fetched again on next use)", "stats": "calibration statistics (measured again on next use)",
               "samples": "calibration text sampled from a model (--data self; sampled again on next use)",
               "word-lstm": "reference LSTMs from train-lm (trained again on next use)"}


def _cache_entries() -> list[dict]:
    entries = []
    for part in CACHE_PARTS:
        folder = cache_dir() / part
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.name.startswith("."):
                continue  # a fetch or write in progress
            entry = {"part": part, "name": path.name, "path": str(path), "bytes": _size_on_disk(path)}
            if part == "stats" and path.suffix == ".safetensors":
                from safetensors import safe_open

                try:
                    with safe_open(str(path), framework="pt") as handle:
                        entry["about"] = handle.metadata() or {}
                except Exception:  # an unreadable entry is still listed, so that it can be cleared
                    entry["about"] = {}
            entries.append(entry)
    return entries


@cache_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def cache_list(as_json):
    """Every cache entry with its size on disk."""
    entries = _cache_entries()
    total = sum(e["bytes"] for e in entries)
    if as_json:
        click.echo(_json_line({"cache": str(cache_dir()), "bytes": total, "entries": entries}))
        return
    click.echo(f"cache: {cache_dir()} ({_human_bytes(total)} in {len(entries)} entries)")
    for part, what in CACHE_PARTS.items():
        mine = [e for e in entries if e["part"] == part]
        if not mine:
            continue
        click.echo(f"{part}/: {what}, {_human_bytes(sum(e['bytes'] for e in mine))}")
        for entry in mine:
            about = entry.get("about") or {}
            detail = (f"  {about.get('stat', '?')} of {about.get('model', '?')} on {about.get('corpus', '?')} ({about.get('windows', '?')} tokens)"
                      if part == "stats" else "")
            click.echo(f"  {_human_bytes(entry['bytes']):>9s}  {entry['name']}{detail}")


@cache_group.command("clear")
@click.option("--stats", "which", flag_value="stats", default=True, help="Calibration statistics (the default).")
@click.option("--models", "which", flag_value="models", help="Built-in models fetched from the package index.")
@click.option("--samples", "which", flag_value="samples", help="Calibration text sampled from models (--data self).")
@click.option("--all", "which", flag_value="all", help="Everything: models, statistics, samples and train-lm's reference LSTMs.")
def cache_clear(which):
    """Delete cache entries: calibration statistics (default), built-in models (--models), or everything (--all)."""
    import shutil

    parts = list(CACHE_PARTS) if which == "all" else [which]
    removed = [e for e in _cache_entries() if e["part"] in parts]
    for entry in removed:
        path = Path(entry["path"])
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    click.echo(f"removed {len(removed)} entries ({_human_bytes(sum(e['bytes'] for e in removed))}) from {', '.join(p + '/' for p in parts)}")


def _size_on_disk(path) -> int | None:
    from lmshrink.pipeline import size_on_disk

    return size_on_disk(path)


def _human_bytes(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


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
