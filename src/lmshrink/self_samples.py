"""Calibration windows sampled from the model itself ("self" in a --data spec).

Text of one domain makes calibration overfit that domain (fwhiten at ratio 0.8 calibrated on Python's reference
manual loses 2.5x on WikiText-2). What a language model generates from a random first token at temperature 1 is
spread over everything it learned, needs no data, and is what the model itself treats as typical (the data-free
calibration of LLM-QAT, Liu et al. 2023). Samples are cached per model and seed: sampling 64 windows of 512 tokens
takes minutes on a CPU.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch
from tqdm.auto import tqdm

from lmshrink.cache import cache_dir, weights_fingerprint, write_safetensors
from lmshrink.errors import InvalidArgument

SAMPLES_FORMAT = 1
BATCH = 16  # sequences generated together: enough to keep a CPU busy, small enough for any model lmshrink runs whole


def samples_cache_dir():
    return cache_dir() / "samples"


def sampled_windows(loaded, count: int, window: int, seed: int = 0, progress: bool = False) -> torch.Tensor:
    """(count, window) token ids: each row a random first token (after the model's BOS when it reads one), then the
    rest of the window sampled at temperature 1 with no end-of-text stop.

    Sampled in batches of BATCH rows, each seeded by (seed, its index), so fewer windows are a prefix of more.
    Deterministic for one model, seed and torch build; cached on disk (LMSHRINK_NO_STATS_CACHE set: not cached)."""
    if not loaded.causal or not hasattr(loaded.model, "generate") or loaded.tokenizer is None:
        raise InvalidArgument("--data", f"'self' samples calibration text from the model, but {loaded.source!r} is not a "
                                        "transformers causal language model with a tokenizer", "a text corpus for this model")
    cached = os.environ.get("LMSHRINK_NO_STATS_CACHE") is None
    path = samples_cache_dir() / f"{_key(loaded, window, seed)}.safetensors"
    have = _read(path, window) if cached else None
    have = have if have is not None else torch.empty(0, window, dtype=torch.long)
    if len(have) >= count:
        return have[:count]
    batches = range(len(have) // BATCH, -(-count // BATCH))
    fresh = [_sample_batch(loaded, window, seed, b) for b in tqdm(batches, desc="sampling calibration text", unit="batch", disable=not progress)]
    ids = torch.cat([have[: batches[0] * BATCH], *fresh]).contiguous()
    if cached:
        write_safetensors(path, {"ids": ids}, {"model": str(loaded.source), "seed": str(seed)})
    return ids[:count]


def _read(path, window: int) -> torch.Tensor | None:
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        ids = load_file(str(path))["ids"]
    except Exception:  # noqa: BLE001 - a damaged cache file is simply sampled again
        return None
    return ids if ids.dtype == torch.long and ids.dim() == 2 and ids.shape[1] == window and len(ids) % BATCH == 0 else None


@torch.no_grad()
def _sample_batch(loaded, window: int, seed: int, index: int) -> torch.Tensor:
    model, tokenizer = loaded.model, loaded.tokenizer
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
    special = set(tokenizer.all_special_ids)
    rows_in_embedding = model.get_input_embeddings().weight.shape[0]
    allowed = torch.tensor([i for i in range(min(len(tokenizer), rows_in_embedding)) if i not in special])
    first = allowed[torch.randint(len(allowed), (BATCH, 1), generator=generator)]
    lead = loaded.leading_token
    prompt = first if lead is None else torch.cat([torch.full((BATCH, 1), lead, dtype=torch.long), first], 1)
    new = window - prompt.shape[1]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    state = torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))  # generate() samples from the global RNG
    try:
        out = model.generate(input_ids=prompt.to(loaded.device), attention_mask=torch.ones_like(prompt).to(loaded.device),
                             do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new, min_new_tokens=new,
                             pad_token_id=pad if pad is not None else 0)
    finally:  # the caller's random state is left as it was
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state_all(state[1])
    return out[:, :window].cpu()


def _key(loaded, window: int, seed: int) -> str:
    parts = {"format": SAMPLES_FORMAT, "model": str(loaded.source), "weights": weights_fingerprint(loaded.model.named_parameters()),
             "window": window, "seed": seed, "torch": torch.__version__}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]
