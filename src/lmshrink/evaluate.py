"""What compression cost: perplexity, fidelity to the original model, and speed."""

from __future__ import annotations

import math
import statistics
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lmshrink.data import Corpus, encode_prefix, model_windows
from lmshrink.distributed import SINGLE, World, all_reduce_sum


@torch.no_grad()
def perplexity(loaded, ids, window: int = 512, progress: bool = True, world: World = SINGLE) -> dict:
    """Perplexity over non-overlapping windows of ``window`` tokens (each window's first token is context only: the
    model's BOS where it starts sequences with one, else the window's first text token).

    ``world`` (lmshrink.distributed): several processes each score their share of the windows and the sums are
    added; every process gets the same result. Returns {"perplexity", "nll", "tokens" (scored), "windows", "window"}.
    """
    windows = model_windows(loaded, ids, window, what="evaluation text")
    total, scored = 0.0, 0
    for row in tqdm(windows[world.shard(len(windows))], desc="perplexity", unit="window", disable=not progress):
        logits = loaded.logits(row[None])[0, :-1].float()
        total += F.cross_entropy(logits, row[1:].to(logits.device), reduction="sum").item()
        scored += row.numel() - 1
    if world.distributed:
        sums = torch.tensor([total, float(scored)], dtype=torch.float64)
        all_reduce_sum(world, [sums], "adding perplexity sums")
        total, scored = float(sums[0]), int(sums[1])
    nll = total / scored
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": scored, "windows": len(windows), "window": window}


def corpus_perplexity(loaded, corpus: Corpus, tokens: int = 8192, window: int = 512, progress: bool = True,
                      world: World = SINGLE) -> dict:
    """Perplexity on the first ``tokens`` tokens of the corpus's evaluation text.

    The result's ``protocol`` says how it was measured, in a short line (the same model gives other figures
    under other protocols, e.g. an LSTM with its hidden state carried across windows).
    """
    ids = encode_prefix(loaded, corpus.test, tokens)
    result = perplexity(loaded, ids, window, progress, world)
    result["corpus"] = corpus.name
    # The word-level LSTM's vocabulary ends every line with <eos>; subword tokenizers see the text as it is.
    eos = "<eos> ends each line" if loaded.family.name == "word-lstm" else "text as-is"
    first = "the model's BOS, then" if loaded.leading_token is not None else "first token of each window context only"
    result["protocol"] = (f"{result['windows']} non-overlapping windows of {window} from the first {len(ids):,} test tokens, "
                          f"state reset per window, {first} ({result['tokens']:,} scored); {eos}")
    return result


@torch.no_grad()
def greedy_sample(loaded, prompt: str = "The capital of France is", new_tokens: int = 24) -> str:
    """The model's greedy continuation of ``prompt`` (causal LMs): what perplexity hides, in words.

    No KV cache (every family's ``logits`` takes whole sequences): a few dozen short steps cost about a second.
    """
    ids = list(loaded.encode(prompt))
    if not ids:
        return ""
    if loaded.leading_token is not None:
        ids.insert(0, loaded.leading_token)
    eos = getattr(loaded.tokenizer, "eos_token_id", None)
    added = []
    for _ in range(new_tokens):
        logits = loaded.logits(torch.tensor([ids + added]))[0, -1]
        token = int(logits.float().argmax())
        if token == eos:
            break
        added.append(token)
    return loaded.tokenizer.decode(added).replace("\n", " ")


def sentences(text: str, count: int, min_words: int = 8) -> list[str]:
    """The first ``count`` lines with at least ``min_words`` words: sentences for fidelity checks."""
    lines = [line.strip() for line in text.splitlines() if len(line.split()) >= min_words]
    return lines[:count]


@torch.no_grad()
def pooled_embeddings(loaded, texts: list[str], batch_size: int = 16, max_length: int = 128) -> torch.Tensor:
    out = []
    for start in range(0, len(texts), batch_size):
        batch = loaded.tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                                 max_length=max_length, return_tensors="pt")
        out.append(loaded.embed(batch["input_ids"], batch["attention_mask"]).float())
    return torch.cat(out)


def fidelity(reference: torch.Tensor, candidate: torch.Tensor) -> dict:
    """Cosine similarity between the reference and candidate embeddings of the same sentences."""
    cosine = F.cosine_similarity(reference, candidate, dim=-1)
    return {"cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min()), "sentences": len(cosine)}


NOISY_SPREAD = 0.15  # a tokens/s figure whose repeats spread more than +-15% around the median is marked noisy


def _forward(loaded, tokens: int, batch_size: int):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, _vocab_size(loaded), (batch_size, tokens), generator=generator)
    mask = torch.ones_like(ids)

    device = loaded.device
    ids, mask = ids.to(device), mask.to(device)

    def run() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            loaded.logits(ids) if loaded.causal else loaded.embed(ids, mask)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # kernels run asynchronously: time them to the end
        return time.perf_counter() - start

    return run


def _speed(times: list[float], tokens: int, batch_size: int) -> dict:
    median = statistics.median(times)
    spread = (max(times) - min(times)) / 2 / median  # half the range, relative to the median
    return {"tokens_per_s": batch_size * tokens / median, "seconds_median": median, "spread": spread,
            "noisy": spread > NOISY_SPREAD, "repeats": len(times)}


def throughput(loaded, tokens: int = 256, batch_size: int = 1, repeats: int = 5, warmup: int = 1) -> dict:
    """Forward-pass tokens per second on a fixed input: warm-up runs, then the median of ``repeats``.

    ``spread`` is half the range of the repeats relative to their median; ``noisy`` says it exceeds NOISY_SPREAD.
    """
    run = _forward(loaded, tokens, batch_size)
    for _ in range(warmup):
        run()
    result = _speed([run() for _ in range(repeats)], tokens, batch_size)
    method = f"median of {repeats} forward passes of {batch_size}x{tokens} tokens after {warmup} warm-up, {torch.get_num_threads()} threads"
    return {**result, "tokens": tokens, "batch_size": batch_size, "threads": torch.get_num_threads(), "method": method}


def compare_throughput(original, compressed, tokens: int = 256, batch_size: int = 1, rounds: int = 7) -> dict:
    """Tokens/s of two models measured alternately (original, compressed, original, ...), so that a busy machine
    slows both alike; the speed-up is the median of the per-round ratios.

    Returns {"before", "after" (as throughput()), "speedup", "speedup_spread", "noisy", "method"}.
    """
    runs = (_forward(original, tokens, batch_size), _forward(compressed, tokens, batch_size))
    for run in runs:
        run()  # warm-up
    before, after = [], []
    for _ in range(rounds):
        before.append(runs[0]())
        after.append(runs[1]())
    ratios = [b / a for b, a in zip(before, after)]
    speedup = statistics.median(ratios)
    spread = (max(ratios) - min(ratios)) / 2 / speedup
    first, second = _speed(before, tokens, batch_size), _speed(after, tokens, batch_size)
    return {"before": first, "after": second, "speedup": speedup, "speedup_spread": spread,
            "noisy": spread > NOISY_SPREAD or first["noisy"] or second["noisy"],
            "method": f"{rounds} rounds alternating the original and the compressed model, one forward pass of "
                      f"{batch_size}x{tokens} tokens each after a warm-up, {torch.get_num_threads()} threads; medians"}


def speed_label(tokens_per_s: float, spread: float, noisy: bool) -> str:
    """'12,345 ± 4%' or, when the repeats disagree, '12,345 ± 35%, noisy'."""
    return f"{tokens_per_s:,.0f} ± {100 * spread:.0f}%" + (", noisy" if noisy else "")


def _vocab_size(loaded) -> int:
    config = getattr(loaded.model, "config", None)
    if config is not None and getattr(config, "vocab_size", None):
        return int(config.vocab_size)
    return int(getattr(loaded.tokenizer, "vocab_size", 0) or len(loaded.tokenizer))
