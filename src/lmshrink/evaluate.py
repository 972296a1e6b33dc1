"""What compression cost: perplexity, fidelity to the original model, and speed."""

from __future__ import annotations

import math
import statistics
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lmshrink.data import Corpus, encode_prefix, token_windows


@torch.no_grad()
def perplexity(loaded, ids, window: int = 512, progress: bool = True) -> dict:
    """Perplexity over non-overlapping windows of ``window`` tokens (each window's first token is context only).

    Returns {"perplexity", "nll", "tokens" (scored), "windows", "window"}.
    """
    windows = token_windows(ids, window, what="evaluation text")
    total, scored = 0.0, 0
    for row in tqdm(windows, desc="perplexity", unit="window", disable=not progress):
        logits = loaded.logits(row[None])[0, :-1].float()
        total += F.cross_entropy(logits, row[1:], reduction="sum").item()
        scored += row.numel() - 1
    nll = total / scored
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": scored, "windows": len(windows), "window": window}


def corpus_perplexity(loaded, corpus: Corpus, tokens: int = 8192, window: int = 512, progress: bool = True) -> dict:
    """Perplexity on the first ``tokens`` tokens of the corpus's evaluation text."""
    ids = encode_prefix(loaded, corpus.test, tokens)
    result = perplexity(loaded, ids, window, progress)
    result["corpus"] = corpus.name
    return result


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


@torch.no_grad()
def throughput(loaded, tokens: int = 256, batch_size: int = 1, repeats: int = 5, warmup: int = 1) -> dict:
    """Forward-pass tokens per second on a fixed input: warm-up runs, then the median of ``repeats``."""
    generator = torch.Generator().manual_seed(0)
    vocab = _vocab_size(loaded)
    ids = torch.randint(0, vocab, (batch_size, tokens), generator=generator)
    mask = torch.ones_like(ids)

    def run():
        loaded.logits(ids) if loaded.causal else loaded.embed(ids, mask)

    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"tokens_per_s": batch_size * tokens / median, "seconds_median": median, "tokens": tokens,
            "batch_size": batch_size, "repeats": repeats, "threads": torch.get_num_threads()}


def _vocab_size(loaded) -> int:
    config = getattr(loaded.model, "config", None)
    if config is not None and getattr(config, "vocab_size", None):
        return int(config.vocab_size)
    return int(getattr(loaded.tokenizer, "vocab_size", 0) or len(loaded.tokenizer))
