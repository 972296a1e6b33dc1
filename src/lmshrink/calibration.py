"""Statistics that importance-aware methods ask for (``Method.needs``), gathered over calibration windows.

- ``input_gram``: sum over tokens of x x^T for the target's input x (in x in), float64 accumulation. A tied
  embedding's input is its output layer's (the final hidden states); an untied embedding (token ids) has none.
- ``input_abs_mean`` / ``input_sq_mean``: per input feature, mean |x| and mean x^2.
- ``fisher``: per weight, the mean over windows of the squared gradient of the loss (empirical Fisher),
  (out, in). Causal LMs use their next-token loss. Encoders without an LM head use the loss of matching
  the original model's outputs, 1/2 mean_t ||h_t - h_t^orig||^2; its gradient is zero at the original
  weights, so what is estimated is its curvature diag(J^T J) (the Gauss-Newton Fisher), with one random
  sign projection of the outputs per window: E[(d (r . h) / dw)^2] = diag(J^T J) for r of random signs.
- ``output_grad_gram``: mean over tokens of g g^T (out x out, float64), g the gradient of that same loss with
  respect to the target's output at the token (KFAC's output-side factor; measured in the Fisher's backward pass).
  Linear targets only (an embedding's output is not indexed by its matrix's rows).
  Its size is out^2 per target: 1536^2 float64 = 19 MB for SmolLM2's MLP, 28672^2 = 6.6 GB for a 70B model's.

Memory stays bounded: one float32 accumulator per target weight (no per-window copies), input statistics
of size in x in (output_grad_gram: out x out), and only the targeted weights require gradients while the Fisher is measured.
Results are cached on disk (safetensors) under ``cache_dir()/stats``, keyed by a fingerprint of all the
model's weights and buffers, the calibration token ids, the window count and length, and the statistic; a later
call with the same key loads them instead of running the model. Only statistics that cost more to measure
than to keep are written (``worth_caching``): measuring took at least CACHE_MIN_SECONDS and at least
CACHE_SECONDS_PER_GB per GB stored. ``lmshrink cache`` lists and clears the entries.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lmshrink.cache import cache_dir, weights_fingerprint, write_safetensors
from lmshrink.data import Corpus, calibration_windows, reference_text
from lmshrink.distributed import SINGLE, World, all_gather_json, all_reduce_sum
from lmshrink.errors import DataError, InvalidArgument
from lmshrink.plan import Target

INPUT_STATS = {"input_gram", "input_abs_mean", "input_sq_mean"}
# lmshrink.frequencies.Frequencies (no forward pass): of the calibration text, and of lmshrink.data.reference_text
TOKEN_STATS = {"token_counts", "reference_token_counts"}
GRADIENT_STATS = {"fisher", "output_grad_gram"}  # measured by a backward pass of the calibration loss
KNOWN_STATS = INPUT_STATS | GRADIENT_STATS | TOKEN_STATS
CACHE_FORMAT = 1
# A statistic is stored only when measuring it took at least this long, and this long per GB it takes on disk:
# reading back runs at hundreds of MB/s, so a stored entry always loads several times faster than it was
# measured, and cheap ones (a small model's fast forward pass) do not fill the disk.
CACHE_MIN_SECONDS = 1.0
CACHE_SECONDS_PER_GB = 10.0


def stats_cache_dir() -> Path:
    return cache_dir() / "stats"


def collect_stats(loaded, targets: list[Target], corpus: Corpus, needs, windows: int = 32, window_len: int = 512,
                  progress: bool = True, cache: bool | None = None, world: World = SINGLE) -> dict[str, dict[str, torch.Tensor]]:
    """{target name: {statistic: tensor}} for every statistic in ``needs``.

    ``cache``: None (default) reads the on-disk cache and writes what ``worth_caching`` accepts; True also
    writes every fresh statistic; False neither reads nor writes. LMSHRINK_NO_STATS_CACHE set: as False.
    ``world``: several processes, each holding the model, measure their share of the windows and add the sums
    (every process gets the same statistics; rank 0 writes the cache).
    """
    needs = set(needs)
    unknown = needs - KNOWN_STATS
    if unknown:
        raise InvalidArgument("needs", f"unknown statistics {sorted(unknown)}", f"{sorted(KNOWN_STATS)}")
    if not needs:
        return {}
    if windows < 1:
        raise InvalidArgument("windows", f"{windows} is below 1", "an integer >= 1")
    if not targets:
        raise InvalidArgument("targets", "is empty", "at least one target to calibrate")
    if needs & TOKEN_STATS:
        counted = _token_counts(loaded, targets, corpus, needs & TOKEN_STATS)
        needs -= TOKEN_STATS
        if not needs:
            return counted
        stats = collect_stats(loaded, targets, corpus, needs, windows, window_len, progress, cache, world)
        return {name: {**stats[name], **counted[name]} for name in stats}
    batches = calibration_windows(loaded, corpus, windows, window_len)
    write_all = cache is True
    if os.environ.get("LMSHRINK_NO_STATS_CACHE"):
        cache = False
    elif cache is None:
        cache = True
    stats: dict[str, dict[str, torch.Tensor]] = {t.name: {} for t in targets}
    missing = set(needs)
    keys = {}
    if cache:
        base = _cache_key_parts(loaded, targets, batches)
        for stat in sorted(needs):
            keys[stat] = _cache_key(base, stat)
            cached = _read_cache(keys[stat], targets, stat)
            if cached is not None:
                for name, tensor in cached.items():
                    stats[name][stat] = tensor
                missing.discard(stat)
    if world.distributed:  # a statistic one process lacks (another node's cache) is measured by all of them
        missing = set().union(*map(set, all_gather_json(world, sorted(missing))))
    if missing:
        start = time.perf_counter()
        fresh = _measure(loaded, targets, batches, missing, progress, world)
        seconds = time.perf_counter() - start
        for name, entry in fresh.items():
            stats[name].update(entry)
        if cache and world.main:
            for stat in missing:
                tensors = {name: entry[stat] for name, entry in fresh.items() if stat in entry}
                # Input statistics ride along a backward pass (about twice the forward they need).
                cost = seconds / 3 if stat in INPUT_STATS and missing & GRADIENT_STATS else seconds
                if write_all or worth_caching(cost, sum(t.numel() * t.element_size() for t in tensors.values())):
                    _write_cache(keys[stat], tensors, stat, {"model": str(loaded.source), "corpus": corpus.name,
                                                             "windows": f"{len(batches)}x{batches.shape[1]}", "seconds": f"{cost:.1f}"})
    return stats


def worth_caching(seconds: float, size_bytes: int) -> bool:
    """Whether a statistic that took ``seconds`` to measure and takes ``size_bytes`` on disk is worth storing."""
    return seconds >= CACHE_MIN_SECONDS and seconds >= CACHE_SECONDS_PER_GB * size_bytes / 1e9


def _token_counts(loaded, targets, corpus: Corpus, wanted: set[str]) -> dict[str, dict]:
    # Token frequencies with the model's tokenizer (GroupReduce, gptq's rare rows) of the whole calibration text and,
    # when asked, of the reference text; a model without a tokenizer gets none, and a method that needs them says so
    # (or takes a --frequencies file).
    if getattr(loaded, "tokenizer", None) is None:
        return {t.name: {} for t in targets}
    if "token_counts" in wanted and not corpus.train:
        raise InvalidArgument("--data", f"{corpus.name!r} has no text to count tokens in (token frequencies weigh the rows)",
                              "a text corpus, or TEXT+self (frequencies from TEXT)")
    from lmshrink.frequencies import corpus_frequencies

    texts = {"token_counts": (corpus.name, lambda: corpus.train), "reference_token_counts": ("reference", reference_text)}
    counted: dict[str, dict] = {t.name: {} for t in targets}
    for stat in sorted(wanted):
        name, text = texts[stat]
        by_vocab = {}  # counted once for an embedding and its head
        for t in targets:
            if t.kind in ("embedding", "lm_head"):  # rows = tokens; other matrices get none
                if t.shape[0] not in by_vocab:
                    by_vocab[t.shape[0]] = corpus_frequencies(loaded, text(), t.shape[0], name=name)
                counted[t.name][stat] = by_vocab[t.shape[0]]
    return counted


def input_module(loaded, target: Target):
    """The module whose input is ``target``'s input (for statistics)."""
    # A tied embedding's matrix is also the output layer's, whose input (the final hidden states) is the only
    # activation that multiplies it: its input statistics are the head's.
    if target.kind == "embedding" and target.tied_head:
        return loaded.model.get_submodule(target.tied_head)
    return target.module


def _measure(loaded, targets, batches, needs, progress, world: World = SINGLE) -> dict[str, dict[str, torch.Tensor]]:
    stats: dict[str, dict[str, torch.Tensor]] = {t.name: {} for t in targets}
    input_needs = needs & INPUT_STATS
    hooks = [input_module(loaded, t).register_forward_hook(input_hook(stats[t.name], input_needs))
             for t in targets] if input_needs else []
    # An embedding's output is indexed by its columns, not by its matrix's rows (tokens): it gets no output_grad_gram.
    grad_names = {t.name for t in targets if t.kind != "embedding"} if "output_grad_gram" in needs else set()
    hooks += [t.module.register_forward_hook(output_grad_hook(stats[t.name])) for t in targets if t.name in grad_names]
    model = loaded.model
    fisher = "fisher" in needs
    backward = bool(needs & GRADIENT_STATS)
    saved_flags = {}
    if backward:
        # Only the targeted weights need gradients: cheaper backward, no gradient buffers for the rest.
        target_params = {id(t.module.weight) for t in targets}
        for param in model.parameters():
            saved_flags[param] = param.requires_grad
            param.requires_grad_(id(param) in target_params)
        accumulators = {t.name: torch.zeros(tuple(t.module.weight.shape), dtype=torch.float32, device=t.module.weight.device)
                        for t in targets}
    was_training = model.training
    model.eval()
    try:
        share = range(len(batches))[world.shard(len(batches))]
        for index in tqdm(share, desc="calibrating" + (" (gradients)" if backward else ""), unit="window", disable=not progress):
            ids = batches[index][None]
            if backward:
                model.zero_grad(set_to_none=True)
                # Encoders: the random output projection is seeded by the window, whichever process measures it.
                loss = _fisher_loss(loaded, ids, torch.Generator().manual_seed(index))
                if not loss.requires_grad:
                    raise DataError(f"{', '.join(t.name for t in targets[:3])}: no target gets a gradient from the calibration "
                                    "loss; they take no part in the model's output (leave them out of --targets)")
                loss.backward()
                for t in targets if fisher else ():
                    grad = t.module.weight.grad
                    if grad is None:
                        raise DataError(f"{t.name}: its weight got no gradient from the calibration loss; it does not take "
                                        "part in the model's output, so it has no Fisher importance (leave it out of --targets)")
                    if not torch.isfinite(grad).all():
                        raise DataError(f"{t.name}: NaN or inf gradient in calibration window {index} "
                                        f"of {len(batches)}; the model overflows on this text, check its dtype or the data")
                    accumulators[t.name].add_(grad.float().square())
            else:
                with torch.no_grad():
                    loaded.logits(ids) if loaded.causal else loaded.embed(ids, torch.ones_like(ids))
    finally:
        for hook in hooks:
            hook.remove()
        if backward:
            model.zero_grad(set_to_none=True)
            for param, flag in saved_flags.items():
                param.requires_grad_(flag)
        model.train(was_training)
    if world.distributed:
        add_across_processes(world, stats, targets, loaded.device, [accumulators[t.name] for t in targets] if fisher else [])
    for t in targets:
        entry = stats[t.name]
        count = entry.pop("_tokens", None)
        for key in ("input_abs_mean", "input_sq_mean"):
            if key in entry:
                entry[key] = (entry[key] / count).float()
        if fisher:
            mean = accumulators[t.name] / len(batches)
            entry["fisher"] = _as_out_in(t, mean)
        if t.name in grad_names:
            entry["output_grad_gram"] = output_grad_mean(t.name, entry)
    return stats


SUM_SHAPES = {"_tokens": lambda m, n: (), "_grad_tokens": lambda m, n: (), "input_gram": lambda m, n: (n, n),
              "input_abs_mean": lambda m, n: (n,), "input_sq_mean": lambda m, n: (n,), "output_grad_gram": lambda m, n: (m, m)}


def add_across_processes(world: World, stats: dict, targets: list[Target], device, extra: list[torch.Tensor] = ()) -> None:
    """Add the running sums of ``input_hook`` / ``output_grad_hook`` in ``stats`` (and the ``extra`` tensors) over
    the processes of ``world``, in place, before any mean is taken. Every process must reduce the same tensors, also
    one whose share of windows was empty or never reached a target: what it lacks enters as zeros."""
    present = all_gather_json(world, {t.name: sorted(k for k in stats[t.name] if k in SUM_SHAPES) for t in targets})
    tensors = []
    for target in targets:
        entry, (m, n) = stats[target.name], target.shape
        for key in sorted(set().union(*(found[target.name] for found in present))):
            value = entry.get(key, 0)
            entry[key] = (value.to(torch.float64) if isinstance(value, torch.Tensor) else
                          torch.full(SUM_SHAPES[key](m, n), float(value), dtype=torch.float64, device=device))
            tensors.append(entry[key])
    all_reduce_sum(world, tensors + list(extra), "adding calibration statistics")


def _fisher_loss(loaded, ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    if loaded.causal:
        logits = loaded.logits(ids)
        return torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:].to(logits.device))
    # Encoder: curvature of the output-matching loss, through one random sign projection of the outputs.
    ids = ids.to(loaded.device)
    hidden = loaded.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.float()
    signs = torch.randint(0, 2, hidden.shape, generator=generator).to(hidden.device, hidden.dtype) * 2 - 1
    return (signs * hidden).sum() / hidden.shape[1] ** 0.5


def _as_out_in(target: Target, tensor: torch.Tensor) -> torch.Tensor:
    # GPT-2's Conv1D stores (in, out); statistics are always reported in (out, in) like Target.weight().
    shape = tuple(target.weight().shape)
    return tensor if tuple(tensor.shape) == shape else tensor.T.contiguous()


def input_hook(entry: dict, needs: set):
    """A forward hook that adds a module's input statistics (``needs``: input_gram, input_abs_mean, input_sq_mean) into
    ``entry`` as running sums, with the token count in ``entry["_tokens"]`` (collect_stats and sequential use it)."""
    def hook(module, inputs, output):
        x = inputs[0].detach()
        if not x.is_floating_point():
            return  # embeddings take token ids, not activations
        x = x.reshape(-1, x.shape[-1]).double()
        entry["_tokens"] = entry.get("_tokens", 0) + x.shape[0]
        if "input_gram" in needs:
            entry["input_gram"] = entry.get("input_gram", 0) + x.T @ x
        if "input_abs_mean" in needs:
            entry["input_abs_mean"] = entry.get("input_abs_mean", 0) + x.abs().sum(0)
        if "input_sq_mean" in needs:
            entry["input_sq_mean"] = entry.get("input_sq_mean", 0) + (x * x).sum(0)

    return hook


def output_grad_hook(entry: dict):
    """A forward hook that hooks the module's output tensor, so the backward pass adds sum_t g_t g_t^T (float64) into
    ``entry["output_grad_gram"]`` and the token count into ``entry["_grad_tokens"]`` (``output_grad_mean`` divides).
    Only outputs that take part in a backward pass (something before them requires grad) are seen."""
    def save(grad):
        g = grad.detach().reshape(-1, grad.shape[-1]).double()
        entry["_grad_tokens"] = entry.get("_grad_tokens", 0) + g.shape[0]
        entry["output_grad_gram"] = entry.get("output_grad_gram", 0) + g.T @ g

    def hook(module, inputs, output):
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(save)

    return hook


def output_grad_mean(name: str, entry: dict) -> torch.Tensor:
    """The running sum of ``output_grad_hook`` in ``entry`` as a per-token mean (float64); a target no gradient reached,
    or one whose gradients overflowed, is a DataError naming it."""
    count = entry.pop("_grad_tokens", 0)
    total = entry.get("output_grad_gram")
    if not count or total is None:
        raise DataError(f"{name}: its output got no gradient from the calibration loss; it does not take part in the "
                        "model's output, so it has no output-gradient statistics (leave it out of --targets)")
    if not torch.isfinite(total).all():
        raise DataError(f"{name}: NaN or inf output gradients in calibration; the model overflows on this text, "
                        "check its dtype or the data")
    return total / count


def _cache_key_parts(loaded, targets, batches) -> dict:
    # Every weight and buffer of the model, not only the targets': a statistic depends on what runs before the target
    # (its inputs) and after it (its gradients), e.g. on what an earlier recipe stage compressed.
    digest = weights_fingerprint(loaded.model.state_dict().items())
    data = hashlib.sha256(batches.cpu().numpy().tobytes()).hexdigest()
    return {"format": CACHE_FORMAT, "model": loaded.source, "weights": digest, "data": data,
            "windows": int(batches.shape[0]), "window_len": int(batches.shape[1]), "causal": bool(loaded.causal)}


def _cache_key(parts: dict, stat: str) -> str:
    return hashlib.sha256(json.dumps({**parts, "stat": stat}, sort_keys=True).encode()).hexdigest()[:32]


def _read_cache(key: str, targets, stat: str) -> dict[str, torch.Tensor] | None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = stats_cache_dir() / f"{stat}-{key}.safetensors"
    if not path.is_file():
        return None
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError):
        return None  # a truncated or corrupted cache file is simply recomputed
    if any(t.name not in tensors for t in targets):
        return None
    device = targets[0].module.weight.device
    return {t.name: tensors[t.name].to(device) for t in targets}


def _write_cache(key: str, tensors: dict[str, torch.Tensor], stat: str, about: dict[str, str]) -> None:
    write_safetensors(stats_cache_dir() / f"{stat}-{key}.safetensors", tensors, {"stat": stat, **about})
