"""Training, evaluation and fine-tuning of word-level LSTM LMs with the example's recipe."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmshrink.errors import InvalidArgument
from lmshrink.models.lstm.corpus import WordCorpus, batchify, get_batch
from lmshrink.models.lstm.model import RNNModel


@torch.no_grad()
def evaluate_lm(model: nn.Module, data: Tensor, batch_size: int = 10, bptt: int = 35, max_tokens: int | None = None) -> dict:
    """The example's evaluation: B parallel streams, hidden state carried across BPTT windows.

    Returns {"perplexity", "nll", "tokens"}; ``max_tokens`` evaluates only the start of ``data``.
    """
    if max_tokens is not None:
        data = data[:max_tokens]
    source = batchify(data, batch_size, bptt=1, what="evaluation data")
    model.eval()
    hidden = None
    total, count = 0.0, 0
    for start in range(0, source.shape[0] - 1, bptt):
        inputs, targets = get_batch(source, start, bptt)
        logits, hidden = model(inputs, hidden)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, reduction="sum").item()
        count += targets.numel()
    nll = total / count
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": count}


@dataclass
class TrainConfig:
    epochs: float = 1.0  # fractional epochs train on the first part of the data
    lr: float = 20.0
    clip: float = 0.25
    bptt: int = 35
    batch_size: int = 20
    seed: int = 1111
    anneal: float = 4.0  # lr /= anneal when validation loss does not improve (the example's schedule)
    valid_tokens: int | None = None  # validate on the start of the valid split only (faster)
    max_steps: int | None = None  # stop after this many updates in total (fine-tuning budgets)


def train_lm(model: RNNModel, corpus: WordCorpus, config: TrainConfig | None = None, log: Callable[[str], None] | None = None,
             train_data: Tensor | None = None) -> dict:
    """Train (or fine-tune) with the example's recipe: SGD, gradient clipping, truncated BPTT, lr annealing.

    Reproducible from ``config.seed`` on one thread count. Returns a history with per-epoch validation
    perplexity and seconds; the best-validation weights are kept, as the example keeps its best checkpoint.
    """
    config = config or TrainConfig()
    if config.epochs <= 0 and not config.max_steps:
        raise InvalidArgument("epochs", f"{config.epochs!r} is not positive", "epochs > 0 (or max_steps > 0)")
    torch.manual_seed(config.seed)
    data = corpus.train if train_data is None else train_data
    source = batchify(data, config.batch_size, bptt=config.bptt, what="training data")
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
    batches_per_epoch = math.ceil((source.shape[0] - 1) / config.bptt)
    epochs = math.ceil(config.epochs) if config.epochs > 0 else 10 ** 9
    history: dict[str, Any] = {"config": asdict(config), "epochs": [], "batches_per_epoch": batches_per_epoch}
    best_loss, best_state, steps, lr = math.inf, None, 0, config.lr
    log = log or (lambda message: None)
    for epoch in range(epochs):
        fraction = min(1.0, config.epochs - epoch) if config.epochs > 0 else 1.0
        limit = max(1, int(batches_per_epoch * fraction))
        model.train()
        hidden = model.init_hidden(config.batch_size)
        start_time, total_loss, seen = time.perf_counter(), 0.0, 0
        for batch, start in enumerate(range(0, source.shape[0] - 1, config.bptt)):
            if batch >= limit or (config.max_steps and steps >= config.max_steps):
                break
            inputs, targets = get_batch(source, start, config.bptt)
            hidden = tuple(h.detach() for h in hidden)  # truncated BPTT: no gradient into earlier windows
            optimizer.zero_grad()
            logits, hidden = model(inputs, hidden)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
            optimizer.step()
            total_loss += loss.item()
            seen += 1
            steps += 1
        seconds = time.perf_counter() - start_time
        valid = evaluate_lm(model, corpus.valid, max_tokens=config.valid_tokens)
        record = {"epoch": epoch + 1, "batches": seen, "train_loss": total_loss / max(seen, 1), "valid_perplexity": valid["perplexity"],
                  "lr": lr, "seconds": seconds, "seconds_per_batch": seconds / max(seen, 1)}
        history["epochs"].append(record)
        log(f"epoch {epoch + 1}: {seen} batches in {seconds:.0f}s, train loss {record['train_loss']:.3f}, "
            f"valid ppl {valid['perplexity']:.2f}, lr {lr:g}")
        if valid["nll"] < best_loss:
            best_loss = valid["nll"]
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            lr /= config.anneal
            for group in optimizer.param_groups:
                group["lr"] = lr
        if config.max_steps and steps >= config.max_steps:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    history["steps"] = steps
    history["best_valid_perplexity"] = math.exp(best_loss)
    return history


def finetune_lm(model: RNNModel, corpus: WordCorpus, *, steps: int | None = None, epochs: float | None = None,
                lr: float = 5.0, batch_size: int = 20, bptt: int = 35, seed: int = 1111, eval_tokens: int | None = None,
                dense_reference: float | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Fine-tune a (compressed) model for ``steps`` updates or ``epochs`` with the training recipe, all parameters.

    Returns test perplexity before and after, and ``recovery``: the fraction of the perplexity lost to
    compression that fine-tuning won back, (before - after) / (before - dense), when ``dense_reference``
    (the dense model's test perplexity on the same tokens) is given.
    """
    if (steps is None) == (epochs is None):
        raise InvalidArgument("steps/epochs", "give exactly one", "steps=N (updates) or epochs=E (passes over the training data)")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise InvalidArgument("steps", f"{steps!r} is not a positive integer", "an integer >= 1")
    before = evaluate_lm(model, corpus.test, max_tokens=eval_tokens)
    config = TrainConfig(epochs=epochs if epochs is not None else 0, max_steps=steps, lr=lr, batch_size=batch_size,
                         bptt=bptt, seed=seed, valid_tokens=eval_tokens)
    start = time.perf_counter()
    history = train_lm(model, corpus, config, log=log)
    after = evaluate_lm(model, corpus.test, max_tokens=eval_tokens)
    result = {"steps": history["steps"], "seconds": time.perf_counter() - start, "lr": lr,
              "before": before["perplexity"], "after": after["perplexity"], "tokens": after["tokens"]}
    if dense_reference is not None:
        lost = before["perplexity"] - dense_reference
        result["recovery"] = (before["perplexity"] - after["perplexity"]) / lost if lost > 0 else math.nan
    return result
