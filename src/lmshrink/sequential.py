"""Block-by-block compression: peak memory is one decoder block and one block boundary of activations, not the model.

    embed the calibration windows (and capture each block's call arguments)
    for each decoder block:
        read its weights from the checkpoint onto the device, in the working dtype
        run the current activations through it with hooks: the statistics its targets' method needs
        factorize its targets (existing methods and allocations)
        run the compressed block: the next block's inputs (closed loop; open loop keeps the original's outputs)
        write its tensors as one shard; free it
    embedding, final norm and head: read once, outside the loop

Closed loop (``calibrate_on="compressed"``) calibrates each block on what the already-compressed blocks
before it produce; open loop (``"original"``) on the original model's activations, which is what the
whole-model ``lmshrink.compress`` does. The Fisher (``fwhiten``, ``fwsvd``, ``tfwsvd``) and the output-gradient
Gram (``kfac``) are exact: the original model's block inputs are stored (on disk) in a first pass, the loss
gradient is taken at the head, and a backward pass goes block by block from the last (``exact_fisher``). ``--allocation
sensitivity`` streams the blocks once more first, for every target's weighted spectrum, then allocates
the one global budget (lmshrink.budget) and factorizes in the main pass.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lmshrink.accounting import count_bytes, count_params
from lmshrink.allocation import allocate
from lmshrink.calibration import (GRADIENT_STATS, INPUT_STATS, TOKEN_STATS, add_across_processes, collect_stats, input_hook,
                                  input_module, output_grad_hook, output_grad_mean)
from lmshrink.data import Corpus, calibration_windows, load_corpus, with_self_share
from lmshrink.distributed import SINGLE, World, agree, all_reduce_sum, barrier, current_world
from lmshrink.errors import DataError, InvalidArgument, LmshrinkError
from lmshrink.methods import get_method
from lmshrink.models import load_model
from lmshrink.models.blocks import DecoderStack, build_skeleton, run_block, to_device
from lmshrink.joint import call_order_groups, joint_targets, merged_stats
from lmshrink.plan import Plan, Target, select_targets
from lmshrink.quantize_factors import DENSE_QUANTIZERS, quantize_factors, reconcile_bits
from lmshrink.recipes import record_recipe
from lmshrink.refit import refit_block
from lmshrink.shards import ShardWriter, fill, materialize, open_source, release, return_freed_memory
from lmshrink.devices import dtype_name, resolve_device, resolve_dtype
from lmshrink.io import check_out, staging_directory, write_manifest
from lmshrink.outputs import scratch_directory
from lmshrink.budget import weighted_spectra
from lmshrink.surgery import CompressionReport, check_plan, compress, factorize_targets, replace_modules
from lmshrink.version import __version__

CALIBRATE_ON = ("compressed", "original")


def _source_path(source) -> Path:
    from lmshrink.models.builtin import BUILTINS, fetch_builtin

    return fetch_builtin(str(source)) if str(source) in BUILTINS else Path(str(source)).expanduser()


class Boundary:
    """The activations at one block boundary, one tensor per calibration window: held where they were made until
    ``limit`` bytes, the rest written to ``folder`` (one safetensors file each) and read back when iterated."""

    _numbers = itertools.count()

    def __init__(self, folder: Path | None = None, limit: int | None = None):
        self.folder, self.limit, self.bytes = folder, limit, 0
        self._items: list = []  # tensors, or (path, device) of offloaded ones

    def append(self, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.folder is not None and self.limit is not None and self.bytes + size > self.limit:
            from safetensors.torch import save_file

            path = self.folder / f"activation-{next(self._numbers)}.safetensors"
            save_file({"x": tensor.detach().cpu().contiguous()}, str(path))
            self._items.append((path, tensor.device))
        else:
            self._items.append(tensor)
            self.bytes += size

    @property
    def offloaded(self) -> int:
        return sum(isinstance(item, tuple) for item in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> torch.Tensor:
        item = self._items[index]
        if isinstance(item, tuple):
            from safetensors.torch import load_file

            return load_file(str(item[0]))["x"].to(item[1])
        return item

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __del__(self):
        for item in self._items:
            if isinstance(item, tuple):
                item[0].unlink(missing_ok=True)


def _block_pass(block, inputs, calls, index, targets, needs, outputs: Boundary | None, world: World = SINGLE):
    """Run ``inputs`` through ``block``: input statistics of ``targets`` (``needs``); outputs appended to ``outputs``.
    Several processes: each runs its own windows and the sums are added across them before the means are taken."""
    stats = {t.name: {} for t in targets}
    hooks = [t.module.register_forward_hook(input_hook(stats[t.name], needs)) for t in targets] if needs else []
    try:
        with torch.no_grad():
            for window, hidden in enumerate(inputs):
                out = run_block(block, hidden, calls[window][index])
                if outputs is not None:
                    outputs.append(out)
                del out
                return_freed_memory()  # this window's intermediates, freed between the kept outputs (shards)
    finally:
        for hook in hooks:
            hook.remove()
    return _finish_input_stats(stats, targets, needs, world, next(block.parameters()).device), outputs


def _finish_input_stats(stats: dict, targets, needs, world: World, device) -> dict:
    # Sums added across processes before the means are taken.
    if world.distributed and needs and targets:
        add_across_processes(world, stats, targets, device)
    for entry in stats.values():
        count = entry.pop("_tokens", None)
        for key in ("input_abs_mean", "input_sq_mean"):
            if key in entry:
                entry[key] = (entry[key] / count).float()
    return stats


def _compress_head_stages(engine: "Engine", hidden, data) -> list[dict]:
    """Stages on the output layer (or the embedding tied to it) weighed by its inputs (gptq on a tied table): after
    the blocks, on the final norm of the last block's outputs (and on ``data``'s token counts where the method's
    options ask for them); their report rows."""
    rows = []
    for index, plan in engine.head_stages:
        method = get_method(plan.method)
        options = method.resolve_options(plan.options)
        targets = select_targets(engine.loaded.candidates(), plan.targets)
        wanted = method.needs_for(options)
        needs = wanted & INPUT_STATS
        stats = {t.name: {} for t in targets}
        hooks = [input_module(engine.loaded, t).register_forward_hook(input_hook(stats[t.name], needs)) for t in targets]
        try:
            with torch.no_grad():
                for window in hidden:  # the head's inputs are seen chunk by chunk: the same sums
                    for positions in engine.stack.logit_chunks(window.shape[1], window.device):
                        engine.stack.logits(window, positions)
        finally:
            for hook in hooks:
                hook.remove()
        stats = _finish_input_stats(stats, targets, needs, engine.world, engine.device)
        if wanted & TOKEN_STATS:  # counted on the text itself: no forward pass
            counts = collect_stats(engine.loaded, targets, data if isinstance(data, Corpus) else load_corpus(data),
                                   wanted & TOKEN_STATS)
            stats = {name: {**stats[name], **counts[name]} for name in stats}
        stage_rows = replace_modules(engine.loaded, targets, method, plan, stats, options)
        if plan.bits is not None:
            quantize_factors(engine.loaded.model, stage_rows, plan.bits, plan.group_size, stats)
        rows += [{**row, "stage": index + 1} for row in stage_rows]
    return rows


class _NoWriter:
    """What a process other than rank 0 writes: nothing (rank 0 writes every shard)."""

    def add(self, tensors) -> None:
        pass

    def end_shard(self) -> None:
        pass

    def close(self) -> None:
        pass


class Engine:
    """One block-by-block run's state: the meta skeleton and its block seam, the checkpoint, device, dtype, targets.

    ``open_engine`` builds it; ``load_outer`` reads everything outside the blocks; ``calibrate`` embeds the
    calibration windows and captures each block's call arguments; ``load_block`` reads one block.
    """

    def __init__(self, source, loaded, stack: DecoderStack, targets, device, dtype, progress, world: World = SINGLE):
        self.source, self.loaded, self.stack, self.targets = source, loaded, stack, targets
        self.device, self.dtype, self.progress, self.world = device, dtype, progress and world.main, world
        self.total_windows = 0  # calibration windows over all processes (this one holds its share)
        self.scratch: Path | None = None  # where activations beyond ``offload_bytes`` go
        self.offload_bytes: int | None = None
        self.by_block = _by_block(stack, targets)  # every stage's targets in the blocks
        # The stages compressing the blocks (open_engine sets them); stages outside the blocks as (index, Plan); the
        # Recipe and its budget solution (None for a single Plan).
        self.stages: list[BlockStage] = []
        self.outer_stages, self.head_stages, self.recipe, self.solution = [], [], None, None
        self.budget_limit: tuple[str, int] | None = None  # (unit, limit) of a recipe's budget, from the original model
        self._probe = None  # (first hidden, calls) of a short input: what block_targets runs a block on to group its linears

    def load_outer(self) -> dict[str, torch.Tensor]:
        """Materialize and fill embedding, final norm, head (and the rest outside the blocks); returns their state."""
        made = {}  # one memo: the embedding and a head tied to it stay one tensor
        for module in self.stack.outer_modules():
            materialize(module, self.device, recurse=False, made=made)
        fill(self.loaded.model, self.source, exclude=(self.stack.blocks_name + ".",))
        return self.outer_state()

    def outer_state(self) -> dict[str, torch.Tensor]:
        """The state of everything outside the blocks, as it is now (after any stage on the embedding or head)."""
        outer = self.stack.blocks_name + "."
        return {k: v for k, v in self.loaded.model.state_dict().items() if not k.startswith(outer)}

    def calibrate(self, corpus: Corpus | str | None, windows: int, window: int):
        """(token windows, first block's input per window, each block's (args, kwargs) per window): this process's
        share of the windows when several run (``total_windows`` counts them all)."""
        corpus = corpus if isinstance(corpus, Corpus) else load_corpus(corpus)
        # Sampling calibration text ("self") runs the whole model: loaded once here, freed at once (its samples are cached).
        reader = load_model(self.loaded.source, device=str(self.device), dtype=self.dtype) if corpus.sampled else self.loaded
        ids = calibration_windows(reader, corpus, windows, window)
        del reader
        self.total_windows = len(ids)
        ids = ids[self.world.shard(len(ids))]
        first_inputs, calls = self.boundary(), []
        for row in ids:
            hidden, call = self.stack.capture(row[None].to(self.device))
            first_inputs.append(hidden)
            calls.append(to_device(call, self.device))
        return ids, first_inputs, calls

    def boundary(self) -> Boundary:
        return Boundary(self.scratch, self.offload_bytes)

    def load_block(self, index: int):
        block = self.stack.blocks[index]
        materialize(block, self.device)
        fill(block, self.source, prefix=self.stack.prefix(index))
        return block

    def block_targets(self, index: int, block, stage: "BlockStage") -> list[Target]:
        """Block ``index``'s targets of ``stage``; with a joint plan, the linears that read one input as one
        JointTarget each (found by running the block once on a short probe: eight tokens through the embedding)."""
        targets = stage.by_block[index]
        if not stage.plan.joint:
            return targets
        if self._probe is None:
            self._probe = self.stack.capture(torch.arange(8)[None].to(self.device))
        prefix = self.stack.prefix(index)
        hidden, calls = self._probe
        groups = call_order_groups(block, [t.name[len(prefix):] for t in targets], lambda: run_block(block, hidden, calls[index]))
        return joint_targets(targets, [[prefix + name for name in group] for group in groups])

    def blocks(self, desc: str):
        return tqdm(range(len(self.stack)), desc=desc, unit="block", disable=not self.progress)


def _by_block(stack: DecoderStack, targets: list[Target]) -> list[list[Target]]:
    return [[t for t in targets if t.name.startswith(stack.prefix(i))] for i in range(len(stack))]


@dataclass
class BlockStage:
    """One plan compressing matrices inside the decoder blocks: its place in the recipe (0 for a single plan), the
    plan (bits reconciled, a --params budget made its ratio), its method and resolved options, its targets by block."""
    index: int
    plan: Plan
    method: object
    options: object
    by_block: list[list[Target]]


def open_engine(source, plan, dtype="auto", device="auto", progress: bool = True, world: World = SINGLE) -> Engine:
    """The skeleton of ``source`` on the meta device, ``plan`` (a Plan, or a Recipe: see ``_split_stages``) checked
    against it, nothing read yet. ``world``: several processes each use their own device (cuda:LOCAL_RANK for "cuda")."""
    from lmshrink.recipes import Recipe, budget_target, check_recipe

    from transformers import AutoConfig, AutoTokenizer

    from lmshrink.models import LoadedModel
    from lmshrink.models.hf import HF_CAUSAL

    device = world.place(resolve_device(device))
    checkpoint = open_source(_source_path(source))
    dtype = resolve_dtype(dtype, checkpoint, device)
    config = getattr(checkpoint, "config", None) or AutoConfig.from_pretrained(checkpoint.folder)
    model = build_skeleton(config, dtype)
    stack = DecoderStack(model)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint.folder, **checkpoint.pretrained_kwargs)
    loaded = LoadedModel(model, HF_CAUSAL, tokenizer, str(source))
    recipe, solution = (plan, None) if isinstance(plan, Recipe) else (None, None)
    stages = [plan] if recipe is None else None
    if recipe is not None:
        stages, solution = check_recipe(loaded, recipe)  # overlaps, keys, the budget solved on the skeleton's shapes
    inner, outer, head = _split_stages(loaded, stack, stages, recipe is not None)
    block_stages = []
    for index, plan in inner:
        _check_block_stage(plan)
        targets = select_targets(loaded.candidates(), plan.targets)
        # An energy plan's ranks need the weights (allocated per block, later); check the rest with a stand-in ratio.
        check_plan(loaded, replace(plan, energy=None, ratio=0.5) if plan.energy is not None else plan)
        plan = reconcile_bits(plan).for_targets(targets)
        method = get_method(plan.method)
        block_stages.append(BlockStage(index, plan, method, method.resolve_options(plan.options), _by_block(stack, targets)))
    head = [(index, reconcile_bits(plan)) for index, plan in head]
    for _, plan in head:
        check_plan(loaded, plan)
    first = block_stages[0].plan
    for index, plan in [(stage.index, stage.plan) for stage in block_stages[1:]] + head:  # one calibration pass serves every stage
        if (plan.calibration_windows, plan.window, plan.self_share) != (first.calibration_windows, first.window, first.self_share):
            raise InvalidArgument(f"recipe stage {index + 1} ({plan.method})",
                                  f"calibrates on {plan.calibration_windows} windows of {plan.window} tokens (self_share "
                                  f"{plan.self_share}), stage {block_stages[0].index + 1} on {first.calibration_windows} of "
                                  f"{first.window} (self_share {first.self_share}); block by block the stages inside the blocks and "
                                  "after them share one calibration", "the same calibration_windows, window and self_share")
    targets = [t for stage in block_stages for by_block in stage.by_block for t in by_block]
    engine = Engine(checkpoint, loaded, stack, targets, device, dtype, progress, world)
    engine.stages, engine.outer_stages, engine.head_stages = block_stages, outer, head
    engine.recipe, engine.solution = recipe, solution
    engine.budget_limit = budget_target(loaded, recipe) if recipe is not None else None  # of the original: before any stage
    return engine


def _check_block_stage(plan: Plan) -> None:
    method = get_method(plan.method)
    method.resolve_options(plan.options)
    if "linear" not in method.target_kinds:
        raise InvalidArgument("--method", f"{plan.method!r} builds its own modules for {', '.join(sorted(method.target_kinds))} only; the "
                              "decoder blocks hold linears", "a method for linears (low-rank methods, nystrom, gptq, quantize, "
                              "prune), with a separate recipe stage for the embedding")
    if method.kind != "lowrank" and plan.allocation == "sensitivity":
        # Its budget is spent across groups in one call; block by block a call sees one block's groups.
        raise InvalidArgument("--allocation", f"sensitivity with {plan.method!r} spends one budget across every MLP at once, "
                              "which block by block sees one block at a time", "--allocation uniform, or the whole-model path")
    if plan.allocation == "sensitivity" and plan.energy is not None:
        raise InvalidArgument("--energy", "an energy plan has no global budget for --allocation sensitivity", "--ratio or --params")


def _split_stages(loaded, stack: DecoderStack, stages: list[Plan], recipe: bool):
    """[(index, stage) inside the decoder blocks], [(index, stage) outside them: embedding, head], [(index, stage) after them].

    Stages outside the blocks run first, on the outer modules, with methods that need no activations (data-free, or
    token counts such as GroupReduce's): every block then calibrates on what the compressed embedding gives it.
    Stages inside the blocks share each block's calibration pass and are applied in recipe order. Stages on the output
    layer (or the embedding tied to it) by a module method weighed by input statistics (gptq) run after the blocks, on
    the head's inputs; the third list."""
    inside, outside, head = [], [], []
    for index, stage in enumerate(stages):
        names = [t.name for t in select_targets(loaded.candidates(), stage.targets)]
        within = [name.startswith(stack.blocks_name + ".") for name in names]
        what = f"recipe stage {index + 1} ({stage.method})"
        if all(within):
            inside.append((index, stage))
            continue
        if not recipe:
            raise InvalidArgument("--targets", f"{[n for n, w in zip(names, within) if not w][:3]} lie outside the decoder "
                                  "blocks; one plan block by block compresses matrices inside them",
                                  "linears, attention, mlp, or globs inside the blocks; a recipe with a separate stage for the "
                                  "embedding or head (--recipe); or the whole-model path")
        if any(within):
            raise InvalidArgument(what, "mixes matrices inside the decoder blocks with ones outside them (embedding, head)",
                                  "one stage for the blocks' linears and separate stages for the embedding and head")
        needs = set(get_method(stage.method).needs_for(stage.options)) - TOKEN_STATS
        if not needs:
            outside.append((index, stage))
            continue
        # The only activations outside the blocks are the head's inputs: a module method weighed by them runs after the
        # blocks (an untied embedding, looked up by one-hot ids, is what gptq rounds to nearest).
        heads = [t for t in select_targets(loaded.candidates(), stage.targets)
                 if t.kind == "lm_head" or t.tied_head or stage.method in DENSE_QUANTIZERS]
        if get_method(stage.method).kind != "module" or needs - INPUT_STATS or len(heads) != len(names):
            raise InvalidArgument(what, f"compresses {names[0]} outside the decoder blocks with {stage.method}, which needs "
                                  f"activation statistics ({', '.join(sorted(needs))})",
                                  "a data-free or token-count method there (svd, rsvd, groupreduce, tt, tt-matrix, quantize), "
                                  "gptq (after the blocks, weighed by the head's inputs), or the whole-model path")
        head.append((index, stage))
    if not inside:
        raise InvalidArgument("--recipe", "no stage compresses matrices inside the decoder blocks, which is what the block-by-block "
                              "engine does", "a stage on the blocks' linears (plus any on the embedding and head), "
                              "or the whole-model path")
    return inside, outside, head


def exact_fisher(engine: Engine, windows: torch.Tensor, first_inputs, calls, scratch: Path, needs=("fisher",)) -> Path:
    """Per target, the mean over windows of the squared gradient of the next-token loss (what collect_stats measures),
    by a forward pass storing every block's inputs on disk and a backward pass block by block.

    Returns the folder holding ``fisher-{block}.safetensors``, one float32 (out, in) tensor per target, and with
    "output_grad_gram" in ``needs`` ``output_grad_gram-{block}.safetensors`` (out, out) float64 (the mean over tokens
    of g g^T, g the loss gradient at the target's output); without "fisher" in ``needs`` no Fisher is kept. Several
    processes: each runs its share of the windows and the sums are added across them (every process gets the total).
    """
    from safetensors.torch import load_file, save_file

    stack = engine.stack
    hidden = first_inputs
    for index in engine.blocks("fisher (forward)"):
        save_file({f"w{w}": h.detach().cpu().contiguous() for w, h in enumerate(hidden)}, str(scratch / f"inputs-{index}.safetensors"))
        block = engine.load_block(index)
        _, hidden = _block_pass(block, hidden, calls, index, [], set(), engine.boundary())
        release(block)
    total_windows = engine.total_windows or len(hidden)
    grads = engine.boundary()
    for w, h in enumerate(hidden):
        grads.append(_loss_gradient(stack, h, windows[w].to(engine.device)))
    for index in tqdm(reversed(range(len(stack))), total=len(stack), desc="fisher (backward)", unit="block", disable=not engine.progress):
        block = engine.load_block(index)
        stored = load_file(str(scratch / f"inputs-{index}.safetensors"))
        targets = engine.by_block[index]
        weights = [t.module.weight for t in targets] if "fisher" in needs else []
        sums = [torch.zeros(w.shape, dtype=torch.float32, device=engine.device) for w in weights]
        grams = {t.name: {} for t in targets} if "output_grad_gram" in needs else {}
        hooks = [t.module.register_forward_hook(output_grad_hook(grams[t.name])) for t in targets] if grams else []
        previous = engine.boundary()
        for w, incoming in enumerate(grads):
            h = stored[f"w{w}"].to(engine.device).requires_grad_(True)
            with torch.enable_grad():
                out = run_block(block, h, calls[w][index])
                found = torch.autograd.grad(out, [h, *weights], grad_outputs=incoming, allow_unused=True)
            previous.append(found[0])
            for target, total, grad in zip(targets, sums, found[1:]):
                if grad is None:
                    raise DataError(f"{target.name}: its weight got no gradient from the calibration loss; it does not take "
                                    "part in the model's output, so it has no Fisher importance (leave it out of --targets)")
                if not torch.isfinite(grad).all():
                    raise DataError(f"{target.name}: NaN or inf gradient in calibration window {w} of {len(grads)}; "
                                    "the model overflows on this text, check its dtype or the data")
                total.add_(grad.float().square())
        for hook in hooks:
            hook.remove()
        if grams:
            _save_output_grad_grams(engine, targets, grams, scratch / f"output_grad_gram-{index}.safetensors")
        if weights:
            all_reduce_sum(engine.world, sums, "adding Fisher sums")
            save_file({t.name: (total / total_windows).cpu() for t, total in zip(targets, sums)}, str(scratch / f"fisher-{index}.safetensors"))
        (scratch / f"inputs-{index}.safetensors").unlink()
        grads = previous
        release(block)
    return scratch


def _loss_gradient(stack: DecoderStack, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The gradient of one window's mean next-token loss with respect to the last block's output ``hidden`` (1, L, d),
    its logits made a chunk of positions at a time (stack.logit_chunks): the same sum as one cross entropy over the
    window without holding the window's logits."""
    hidden = hidden.detach().requires_grad_(True)
    targets = ids[1:]
    grad = torch.zeros_like(hidden)
    for positions in stack.logit_chunks(targets.numel(), hidden.device):
        logits = stack.logits(hidden, positions)[0].float()
        loss = F.cross_entropy(logits, targets[positions], reduction="sum") / targets.numel()
        grad += torch.autograd.grad(loss, hidden)[0]
    return grad


def _save_output_grad_grams(engine: Engine, targets, grams: dict, path: Path) -> None:
    # Sums and token counts added across processes (a process with no windows adds zeros), then per-token means.
    from safetensors.torch import save_file

    if engine.world.distributed:
        add_across_processes(engine.world, grams, targets, engine.device)
    save_file({t.name: output_grad_mean(t.name, grams[t.name]).cpu() for t in targets}, str(path))


def _gradient_stats(folder: Path | None, index: int, device) -> dict[str, dict[str, torch.Tensor]]:
    """{target: {"fisher" / "output_grad_gram": tensor}} of block ``index`` from what ``exact_fisher`` wrote."""
    from safetensors.torch import load_file

    found: dict[str, dict[str, torch.Tensor]] = {}
    for stat in sorted(GRADIENT_STATS) if folder is not None else ():
        path = folder / f"{stat}-{index}.safetensors"
        if path.is_file():
            for name, tensor in load_file(str(path)).items():
                found.setdefault(name, {})[stat] = tensor.to(device)
    return found


def _sensitivity_ranks(engine: Engine, stage: BlockStage, first_inputs, calls, fisher_dir):
    """One open-loop streamed pass for every target's weighted spectrum, then the stage's global budget (lmshrink.budget)."""
    from lmshrink.budget import ranks_from_spectra

    plan, method, options = stage.plan, stage.method, stage.options
    spectra, units, everything = {}, set(), []
    hidden, world = first_inputs, engine.world
    for index in engine.blocks(f"spectra ({method.name})"):
        block = engine.load_block(index)
        stats, hidden = _block_pass(block, hidden, calls, index, stage.by_block[index], method.needs & INPUT_STATS, engine.boundary(),
                                    world)
        gradient_stats = _gradient_stats(fisher_dir, index, engine.device)
        targets = engine.block_targets(index, block, stage)
        everything += targets
        found = {name: {**entry, **gradient_stats.get(name, {})} for name, entry in stats.items()}
        for target, (values, in_loss) in zip(targets, weighted_spectra(targets, method, options, lambda t: merged_stats(t, found), world)):
            spectra[target.name] = values
            units.add(in_loss)
        release(block)
    return ranks_from_spectra(everything, plan, {}, spectra, units)


def compress_sequential(source, plan, data: Corpus | str | None, out: str | Path, dtype: str = "auto",
                        device: str = "auto", calibrate_on: str = "compressed", progress: bool = True,
                        overwrite: bool = False, offload_bytes: int | None = None, world: World | None = None,
                        refit: bool = False) -> CompressionReport:
    """Compress a Hugging Face causal decoder (a safetensors directory, one or many shards; a .gguf file; a built-in
    name) block by block into ``out`` (sharded safetensors + index + lmshrink.json). See the module docstring.

    ``plan``: a Plan on matrices inside the decoder blocks, or a Recipe (lmshrink.recipes) with one or more stages
    inside the blocks (disjoint targets, e.g. nystrom on the MLPs and fwhiten on attention: one calibration pass per
    block serves them all, applied in recipe order) and any stages on the embedding and head; those run first, with
    data-free or token-count methods, so the blocks calibrate on what the compressed embedding gives them; a gptq
    stage on the head (or the embedding tied to it) runs after the last block, weighed by the final hidden states.
    Budgets are solved as on the whole-model path. Rows of a recipe's report say their stage.

    ``dtype``: "auto" (the checkpoint's declared dtype; a GGUF: bfloat16), "float32", "bfloat16" or "float16":
    weights are held and saved in it, each factorization runs in float32 (float64 where the method does).
    ``device``: "auto" (CUDA when present), "cpu" or "cuda". ``offload_bytes``: the activations at a block
    boundary beyond this many bytes go to a scratch folder beside ``out`` (default: all kept in memory).
    ``refit``: after each block is factorized, refit every factorized matrix's left factor so the block's linears
    reproduce the original model's outputs on the compressed inputs (lmshrink.refit; error compensation).

    ``world`` (default: the initialized torch.distributed process group, if any; lmshrink.distributed): several
    processes split the calibration windows and each block's matrices; only rank 0 writes ``out``. Every process
    must call this with the same arguments (checked: a mismatch is refused on every process before any work).
    """
    start = time.perf_counter()
    world = current_world() if world is None else world
    failure = None
    try:  # checks that may fail on one process only (the output, the device) end the run on every process
        if calibrate_on not in CALIBRATE_ON:
            raise InvalidArgument("--calibrate-on", f"{calibrate_on!r} is not supported", ", ".join(CALIBRATE_ON))
        if world.main:
            check_out(out, overwrite)  # before minutes of work
        engine = open_engine(source, plan, dtype, device, progress, world)
        builders = [stage.plan.method for stage in engine.stages if stage.method.kind != "lowrank"]
        if refit and builders:
            raise InvalidArgument("--refit", f"refits the left factor of low-rank layers; {builders[0]!r} builds none "
                                  "(nystrom already refits its down projection by least squares)", "low-rank methods, or no --refit")
    except LmshrinkError as error:
        failure = error
    agree(world, _fingerprint(source, plan, dtype, device, calibrate_on, offload_bytes, refit), failure)
    loaded, model, dtype, device = engine.loaded, engine.loaded.model, engine.dtype, engine.device
    stages, first = engine.stages, engine.stages[0]
    needs = frozenset().union(*(stage.method.needs for stage in stages))
    params_before, bytes_before = count_params(model), count_bytes(model)
    rows, outer_reports = [], []
    # Rank 0 writes the output (staged beside it, swapped in at the end); the others only need scratch space.
    staged = staging_directory(out, overwrite) if world.main else contextlib.nullcontext(None)
    with staged as staging, scratch_directory(".scratch-" if world.main else "lmshrink-scratch-", staging) as scratch:
        engine.scratch, engine.offload_bytes = Path(scratch), offload_bytes
        writer = ShardWriter(staging) if world.main else _NoWriter()  # tensors as held: the working dtype; k-bit scales float16
        engine.load_outer()
        for index, stage in engine.outer_stages:  # embedding / head stages: before the blocks calibrate on their output
            outer_reports.append(compress(loaded, stage, data=data, progress=False, world=world))
            outer_reports[-1].plan["stage"] = index + 1
        windows, first_inputs, calls = (engine.calibrate(with_self_share(data, first.plan.self_share), first.plan.calibration_windows,
                                                         first.plan.window) if needs or refit or engine.head_stages
                                        else (None, engine.boundary(), []))
        stats_start = time.perf_counter()
        fisher_dir = exact_fisher(engine, windows, first_inputs, calls, Path(scratch), needs & GRADIENT_STATS) if needs & GRADIENT_STATS else None
        ranks = {stage.index: _sensitivity_ranks(engine, stage, first_inputs, calls, fisher_dir) for stage in stages
                 if stage.plan.allocation == "sensitivity" and stage.method.kind == "lowrank"}
        stats_seconds = time.perf_counter() - stats_start

        hidden = original_hidden = first_inputs  # the compressed and the original model's activations (closed loop + refit)
        names = "+".join(stage.method.name for stage in stages)
        for index in engine.blocks(f"{names} ({calibrate_on} activations{', refit' if refit else ''})"):
            block = engine.load_block(index)
            matrices = engine.by_block[index]
            stats, original_outputs = {t.name: {} for t in matrices}, None
            if needs & INPUT_STATS or calibrate_on == "original":  # one pass: every stage's statistics
                stats, original_outputs = _block_pass(block, hidden, calls, index, matrices, needs & INPUT_STATS,
                                                      engine.boundary() if calibrate_on == "original" else None, world)
            for name, entry in _gradient_stats(fisher_dir, index, device).items():
                stats[name].update(entry)
            original = copy.deepcopy(block) if refit else None
            stage_rows = [(stage, _compress_block_stage(engine, index, block, stage, stats, ranks.get(stage.index))) for stage in stages]
            if refit:
                original_hidden = _refit(engine, index, original, block, [row for _, r in stage_rows for row in r],
                                         original_hidden if calibrate_on == "compressed" else hidden, hidden, calls, calibrate_on == "compressed")
            for stage, block_rows in stage_rows:
                if stage.plan.bits is not None:  # after the refit; the next block calibrates on what the stored (quantized) block gives
                    quantize_factors(loaded.model, block_rows, stage.plan.bits, stage.plan.group_size, stats)
                rows += [{**row, "stage": stage.index + 1} for row in block_rows] if engine.recipe is not None else block_rows
            if calibrate_on == "original":
                hidden = original_outputs
            elif hidden:
                _, hidden = _block_pass(block, hidden, calls, index, [], set(), engine.boundary())
            writer.add({engine.stack.prefix(index) + k: v for k, v in block.state_dict().items()})
            writer.end_shard()
            release(block)
            for target in matrices:
                release(target.module)  # a replaced module is out of the model's tree, but its Target still holds it
            del stats
        rows += _compress_head_stages(engine, hidden, data)  # gptq on the table: weighed by the final hidden states
        writer.add(engine.outer_state())  # embedding, final norm, head: as the stages outside and after the blocks left them
        writer.end_shard()
        release(model)
        writer.close()
        missed = None
        if engine.recipe is not None:  # every row says its stage (1-based, as the recipe lists them)
            rows = sorted([{**row, "stage": report.plan["stage"]} for report in outer_reports for row in report.modules] + rows,
                          key=lambda row: row["stage"])
            loaded.compression = rows
            plans = [plan for _, plan in sorted([*engine.outer_stages, *engine.head_stages, *((stage.index, stage.plan) for stage in stages)],
                                                key=lambda pair: pair[0])]
            missed = record_recipe(loaded, engine.recipe, plans, engine.solution, engine.budget_limit, params_before)
        loaded.compression = rows
        plan_dict = {**first.plan.to_dict(), "executor": "sequential", "calibrate_on": calibrate_on, "refit": refit, "dtype": dtype_name(dtype),
                     "device": str(device), "processes": world.size,
                     **({"stage": first.index + 1, "stages_in_blocks": [stage.index + 1 for stage in stages]} if engine.recipe else {})}
        if world.main:
            write_manifest(loaded, staging, dtype, run={"processes": world.size, "executor": "sequential"})
    barrier(world, "finishing (rank 0 writes the output)")  # the others return once the output is in place
    report = CompressionReport(plan_dict, rows, params_before, count_params(model), bytes_before, count_bytes(model),
                               time.perf_counter() - start, stats_seconds)
    report.notes += [note for outer in outer_reports for note in outer.notes] + ([missed] if missed else [])
    if not report.compressed:
        report.notes.append("no target became smaller: every matrix stays dense at this amount")
    return report


def _fingerprint(source, plan: Plan, dtype, device, calibrate_on, offload_bytes, refit) -> dict:
    """What every process of a run must agree on: lmshrink's version and every argument that shapes the result
    (not ``out`` and ``overwrite``: only rank 0 writes)."""
    return {"lmshrink": __version__, "source": str(source), "plan": plan.to_dict(), "dtype": str(dtype), "device": str(device),
            "calibrate_on": calibrate_on, "offload_bytes": offload_bytes, "refit": refit}


def _refit(engine: Engine, index: int, original, block, rows: list[dict], original_inputs, compressed_inputs, calls, closed: bool):
    """Refit block ``index``'s factorized matrices (lmshrink.refit) and record it in their rows; frees ``original``.
    Returns the original model's activations after this block (closed loop: the next block's refit needs them)."""
    prefix = engine.stack.prefix(index)
    names = [row["name"][len(prefix):] for row in rows if row["status"] == "factorized"]
    outcome = refit_block(original, block, names, original_inputs, compressed_inputs, calls, index, engine.world)
    for row in rows:
        row.update(outcome.get(row["name"][len(prefix):], {}))
    outputs = _block_pass(original, original_inputs, calls, index, [], set(), engine.boundary())[1] if closed else original_inputs
    release(original)
    return outputs


def _compress_block_stage(engine: Engine, index: int, block, stage: BlockStage, stats: dict, ranks: dict | None) -> list[dict]:
    """Apply ``stage`` to block ``index``'s targets and swap the new layers in; their report rows. Low-rank methods:
    factorized at ``ranks`` (a sensitivity allocation's) or ranks allocated in the block, split across processes by
    cost (every process gets every factor: all run the compressed block, rank 0 writes it). Nystrom: the block's MLP,
    its channels chosen on the block's statistics."""
    targets = engine.block_targets(index, block, stage)  # --joint: linears of one input stacked, their stats merged
    stats = {t.name: merged_stats(t, stats) for t in targets}
    if stage.method.kind != "lowrank":
        return replace_modules(engine.loaded, targets, stage.method, stage.plan, stats, stage.options)
    ranks = ranks if ranks is not None else allocate(targets, stage.plan, stats, engine.world)
    return factorize_targets(engine.loaded, targets, ranks, stage.method, stats, stage.options, False, engine.world)
