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
whole-model ``lmshrink.compress`` does. The Fisher (``fwhiten``, ``fwsvd``, ``tfwsvd``) is exact: the
original model's block inputs are stored (on disk) in a first pass, the loss gradient is taken at the
head, and a backward pass goes block by block from the last (``exact_fisher``). ``--allocation
sensitivity`` streams the blocks once more first, for every target's weighted spectrum, then allocates
the one global budget (lmshrink.budget) and factorizes in the main pass.
"""

from __future__ import annotations

import itertools
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lmshrink.accounting import count_bytes, count_params
from lmshrink.allocation import allocate
from lmshrink.calibration import INPUT_STATS, _input_hook
from lmshrink.data import Corpus, calibration_windows, load_corpus
from lmshrink.errors import DataError, InvalidArgument
from lmshrink.methods import get_method
from lmshrink.models.blocks import DecoderStack, build_skeleton, run_block, to_device
from lmshrink.plan import Plan, select_targets
from lmshrink.shards import ShardWriter, fill, materialize, open_source, release
from lmshrink.sharded_io import DTYPES, check_out, dtype_name, staging_directory, write_manifest
from lmshrink.surgery import CompressionReport, _factorize_target, check_plan

CALIBRATE_ON = ("compressed", "original")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """"auto" (CUDA when present), "cpu", "cuda" or "cuda:N"; asking for CUDA on a machine without it is an error."""
    text = "auto" if device is None else str(device)
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise InvalidArgument("--device", f"{text!r} was asked but this machine has no CUDA device "
                                  f"(torch {torch.__version__}, {torch.get_num_threads()} CPU threads)", "cpu or auto")
        return torch.device(text)
    raise InvalidArgument("--device", f"{text!r} is not a device", "cpu, cuda, cuda:N or auto (CUDA when present)")


def resolve_dtype(dtype: str | torch.dtype | None, source, device: torch.device) -> torch.dtype:
    """"auto" is the dtype the checkpoint declares (config dtype; a GGUF: bfloat16); else float32/bfloat16/float16."""
    if dtype is None or dtype == "auto":
        chosen = source.declared_dtype()
    elif isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        chosen = dtype
    elif dtype in DTYPES:
        chosen = DTYPES[dtype]
    else:
        raise InvalidArgument("--dtype", f"{dtype!r} is not supported", "auto, " + ", ".join(DTYPES))
    if chosen not in DTYPES.values():
        chosen = torch.float32  # a checkpoint in float64 or an integer type: work in float32
    if device.type == "cuda" and chosen == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise InvalidArgument("--dtype", f"bfloat16 does not run on {torch.cuda.get_device_name(device)}", "float16 or float32 on this GPU")
    return chosen


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


def _block_pass(block, inputs, calls, index, targets, needs, outputs: Boundary | None):
    """Run ``inputs`` through ``block``: input statistics of ``targets`` (``needs``); outputs appended to ``outputs``."""
    stats = {t.name: {} for t in targets}
    hooks = [t.module.register_forward_hook(_input_hook(stats[t.name], needs)) for t in targets] if needs else []
    try:
        with torch.no_grad():
            for window, hidden in enumerate(inputs):
                out = run_block(block, hidden, calls[window][index])
                if outputs is not None:
                    outputs.append(out)
    finally:
        for hook in hooks:
            hook.remove()
    for entry in stats.values():
        count = entry.pop("_tokens", None)
        for key in ("input_abs_mean", "input_sq_mean"):
            if key in entry:
                entry[key] = (entry[key] / count).float()
    return stats, outputs


class Engine:
    """One block-by-block run's state: the meta skeleton and its block seam, the checkpoint, device, dtype, targets.

    ``open_engine`` builds it; ``load_outer`` reads everything outside the blocks; ``calibrate`` embeds the
    calibration windows and captures each block's call arguments; ``load_block`` reads one block.
    """

    def __init__(self, source, loaded, stack: DecoderStack, targets, device, dtype, progress):
        self.source, self.loaded, self.stack, self.targets = source, loaded, stack, targets
        self.device, self.dtype, self.progress = device, dtype, progress
        self.scratch: Path | None = None  # where activations beyond ``offload_bytes`` go
        self.offload_bytes: int | None = None
        self.by_block = [[t for t in targets if t.name.startswith(stack.prefix(i))] for i in range(len(stack))]

    def load_outer(self) -> dict[str, torch.Tensor]:
        """Materialize and fill embedding, final norm, head (and the rest outside the blocks); returns their state."""
        outer = self.stack.blocks_name + "."
        made = {}  # one memo: the embedding and a head tied to it stay one tensor
        for module in self.stack.outer_modules():
            materialize(module, self.device, recurse=False, made=made)
        fill(self.loaded.model, self.source, exclude=(outer,))
        return {k: v for k, v in self.loaded.model.state_dict().items() if not k.startswith(outer)}

    def calibrate(self, corpus: Corpus | str | None, windows: int, window: int):
        """(token windows, first block's input per window, each block's (args, kwargs) per window)."""
        ids = calibration_windows(self.loaded, corpus if isinstance(corpus, Corpus) else load_corpus(corpus), windows, window)
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

    def blocks(self, desc: str):
        return tqdm(range(len(self.stack)), desc=desc, unit="block", disable=not self.progress)


def open_engine(source, plan: Plan, dtype="auto", device="auto", progress: bool = True) -> Engine:
    """The skeleton of ``source`` on the meta device, its targets under ``plan`` checked, nothing read yet."""
    from transformers import AutoConfig, AutoTokenizer

    from lmshrink.models import LoadedModel
    from lmshrink.models.hf import HF_CAUSAL

    device = resolve_device(device)
    checkpoint = open_source(_source_path(source))
    dtype = resolve_dtype(dtype, checkpoint, device)
    config = getattr(checkpoint, "config", None) or AutoConfig.from_pretrained(checkpoint.folder)
    model = build_skeleton(config, dtype)
    stack = DecoderStack(model)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint.folder, **checkpoint.pretrained_kwargs)
    loaded = LoadedModel(model, HF_CAUSAL, tokenizer, str(source))
    targets = select_targets(loaded.candidates(), plan.targets)
    outside = [t.name for t in targets if not t.name.startswith(stack.blocks_name + ".")]
    if outside:
        raise InvalidArgument("--targets", f"{outside[:3]} lie outside the decoder blocks, which the block-by-block engine "
                              "does not compress yet", "linears, attention, mlp, or globs inside the blocks")
    # An energy plan's ranks need the weights (allocated per block, later); check everything else with a stand-in ratio.
    check_plan(loaded, replace(plan, energy=None, ratio=0.5) if plan.energy is not None else plan)
    return Engine(checkpoint, loaded, stack, targets, device, dtype, progress)


def exact_fisher(engine: Engine, windows: torch.Tensor, first_inputs, calls, scratch: Path) -> Path:
    """Per target, the mean over windows of the squared gradient of the next-token loss (what collect_stats measures),
    by a forward pass storing every block's inputs on disk and a backward pass block by block.

    Returns the folder holding ``fisher-{block}.safetensors``, one float32 (out, in) tensor per target.
    """
    from safetensors.torch import load_file, save_file

    stack = engine.stack
    hidden = first_inputs
    for index in engine.blocks("fisher (forward)"):
        save_file({f"w{w}": h.detach().cpu().contiguous() for w, h in enumerate(hidden)}, str(scratch / f"inputs-{index}.safetensors"))
        block = engine.load_block(index)
        _, hidden = _block_pass(block, hidden, calls, index, [], set(), engine.boundary())
        release(block)
    grads = engine.boundary()
    for w, h in enumerate(hidden):
        h = h.detach().requires_grad_(True)
        ids = windows[w].to(engine.device)
        loss = F.cross_entropy(stack.logits(h)[0, :-1].float(), ids[1:])
        grads.append(torch.autograd.grad(loss, h)[0])
    for index in tqdm(reversed(range(len(stack))), total=len(stack), desc="fisher (backward)", unit="block", disable=not engine.progress):
        block = engine.load_block(index)
        stored = load_file(str(scratch / f"inputs-{index}.safetensors"))
        targets = engine.by_block[index]
        weights = [t.module.weight for t in targets]
        sums = [torch.zeros(w.shape, dtype=torch.float32, device=engine.device) for w in weights]
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
        save_file({t.name: (total / len(grads)).cpu() for t, total in zip(targets, sums)}, str(scratch / f"fisher-{index}.safetensors"))
        (scratch / f"inputs-{index}.safetensors").unlink()
        grads = previous
        release(block)
    return scratch


def _sensitivity_ranks(engine: Engine, plan, method, options, first_inputs, calls, fisher_dir):
    """One open-loop streamed pass for every target's weighted spectrum, then the global budget (lmshrink.budget)."""
    from safetensors.torch import load_file

    from lmshrink.budget import error_spectrum, ranks_from_spectra

    spectra, units = {}, set()
    hidden = first_inputs
    for index in engine.blocks("spectra"):
        block = engine.load_block(index)
        stats, hidden = _block_pass(block, hidden, calls, index, engine.by_block[index], method.needs & INPUT_STATS, engine.boundary())
        fisher = load_file(str(fisher_dir / f"fisher-{index}.safetensors")) if fisher_dir else {}
        for target in engine.by_block[index]:
            entry = {**stats[target.name], **({"fisher": fisher[target.name].to(engine.device)} if fisher else {})}
            values, in_loss = error_spectrum(target.weight().float(), entry, options)
            spectra[target.name] = values.cpu()
            units.add(in_loss)
        release(block)
    return ranks_from_spectra(engine.targets, plan, {}, spectra, units)


def compress_sequential(source, plan: Plan, data: Corpus | str | None, out: str | Path, dtype: str = "auto",
                        device: str = "auto", calibrate_on: str = "compressed", progress: bool = True,
                        overwrite: bool = False, offload_bytes: int | None = None) -> CompressionReport:
    """Compress a Hugging Face causal decoder (a safetensors directory, one or many shards; a .gguf file; a built-in
    name) block by block into ``out`` (sharded safetensors + index + lmshrink.json). See the module docstring.

    ``dtype``: "auto" (the checkpoint's declared dtype; a GGUF: bfloat16), "float32", "bfloat16" or "float16":
    weights are held and saved in it, each factorization runs in float32 (float64 where the method does).
    ``device``: "auto" (CUDA when present), "cpu" or "cuda". ``offload_bytes``: the activations at a block
    boundary beyond this many bytes go to a scratch folder beside ``out`` (default: all kept in memory).
    """
    from safetensors.torch import load_file

    start = time.perf_counter()
    method = get_method(plan.method)
    options = method.resolve_options(plan.options)
    if method.kind != "lowrank":
        raise InvalidArgument("--method", f"{plan.method!r} builds its own modules; the block-by-block engine runs low-rank methods",
                              "a low-rank method (svd, rsvd, asvd, svdllm, fwsvd, tfwsvd, fwhiten), or the whole-model path")
    if calibrate_on not in CALIBRATE_ON:
        raise InvalidArgument("--calibrate-on", f"{calibrate_on!r} is not supported", ", ".join(CALIBRATE_ON))
    if getattr(plan, "bits", None) is not None:
        raise InvalidArgument("--bits", "the block-by-block engine stores float factors",
                              "no --bits with --sequential (the whole-model path quantizes factors)")
    if plan.allocation == "sensitivity" and plan.energy is not None:
        raise InvalidArgument("--energy", "an energy plan has no global budget for --allocation sensitivity", "--ratio or --params")
    check_out(out, overwrite)  # before minutes of work
    engine = open_engine(source, plan, dtype, device, progress)
    loaded, model, dtype, device = engine.loaded, engine.loaded.model, engine.dtype, engine.device
    plan = plan.for_targets(engine.targets)
    params_before, bytes_before = count_params(model), count_bytes(model)
    rows = []
    with staging_directory(out, overwrite) as staging, tempfile.TemporaryDirectory(dir=staging, prefix=".scratch-") as scratch:
        engine.scratch, engine.offload_bytes = Path(scratch), offload_bytes
        writer = ShardWriter(staging, dtype)
        writer.add(engine.load_outer())
        writer.end_shard()
        windows, first_inputs, calls = engine.calibrate(data, plan.calibration_windows, plan.window) if method.needs else (None, engine.boundary(), [])
        stats_start = time.perf_counter()
        fisher_dir = exact_fisher(engine, windows, first_inputs, calls, Path(scratch)) if "fisher" in method.needs else None
        ranks = (_sensitivity_ranks(engine, plan, method, options, first_inputs, calls, fisher_dir)
                 if plan.allocation == "sensitivity" else None)
        stats_seconds = time.perf_counter() - stats_start

        hidden = first_inputs
        for index in engine.blocks(f"{method.name} ({calibrate_on} activations)"):
            block = engine.load_block(index)
            block_targets = engine.by_block[index]
            needs = method.needs & INPUT_STATS
            stats, original_outputs = {t.name: {} for t in block_targets}, None
            if needs or calibrate_on == "original":
                stats, original_outputs = _block_pass(block, hidden, calls, index, block_targets, needs,
                                                      engine.boundary() if calibrate_on == "original" else None)
            if fisher_dir is not None:
                for name, tensor in load_file(str(fisher_dir / f"fisher-{index}.safetensors")).items():
                    stats[name]["fisher"] = tensor.to(device)
            block_ranks = ranks if ranks is not None else allocate(block_targets, plan, stats)
            for target in block_targets:
                rows.append(_factorize_target(loaded, target, block_ranks[target.name], method, stats[target.name], options, False))
            if calibrate_on == "original":
                hidden = original_outputs
            elif hidden:
                _, hidden = _block_pass(block, hidden, calls, index, [], set(), engine.boundary())
            writer.add({engine.stack.prefix(index) + k: v for k, v in block.state_dict().items()})
            writer.end_shard()
            release(block)
            for target in block_targets:
                release(target.module)  # a replaced module is out of the model's tree, but its Target still holds it
            del stats
        release(model)
        writer.close()
        loaded.compression = rows
        plan_dict = {**plan.to_dict(), "executor": "sequential", "calibrate_on": calibrate_on, "dtype": dtype_name(dtype),
                     "device": str(device)}
        write_manifest(loaded, staging, dtype)
    report = CompressionReport(plan_dict, rows, params_before, count_params(model), bytes_before, count_bytes(model),
                               time.perf_counter() - start, stats_seconds)
    if not report.compressed:
        report.notes.append("no target became smaller: every matrix stays dense at this amount")
    return report
