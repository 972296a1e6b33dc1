"""Refinement training: a few optimizer steps of next-token loss on corpus windows, after compression.

By default only the factorized layers' parameters train (``train="factors"``: every parameter of every
FactorizedModule, e.g. LowRankLinear's left/right, GroupReduce's block factors); ``train="all"`` trains the
whole model; a tuple of glob patterns on parameter names trains those (e.g. the dense linears of an
uncompressed control run).

The loss is next-token cross-entropy, or, given a ``teacher`` (the model before compression), distillation:
the KL divergence from the teacher's next-token distribution to the student's at every position. The soft
targets carry the teacher's whole distribution per token, more signal per step than the one observed token.

Windows come from the start of the corpus's calibration text, in order, so a run is reproducible.
"""

from __future__ import annotations

import fnmatch
import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lmshrink.bounds import Bounds, check_number
from lmshrink.data import Corpus, encode_prefix, load_corpus, model_windows
from lmshrink.errors import InvalidArgument
from lmshrink.layers.base import FactorizedModule

TRAIN_CHOICES = ("factors", "all")


def trainable_parameters(model: torch.nn.Module, train: str | tuple[str, ...] = "factors") -> dict[str, torch.nn.Parameter]:
    """{name: parameter} that ``train`` selects (shared parameters once)."""
    if isinstance(train, (tuple, list)):
        return {name: p for name, p in model.named_parameters() if any(fnmatch.fnmatchcase(name, g) for g in train)}
    if train not in TRAIN_CHOICES:
        raise InvalidArgument("train", f"{train!r} is not a choice", f"one of {TRAIN_CHOICES}, or a tuple of glob patterns on parameter names")
    if train == "all":
        return dict(model.named_parameters())
    chosen, seen = {}, set()
    for module_name, module in model.named_modules():
        if isinstance(module, FactorizedModule):
            for name, param in module.named_parameters():
                if id(param) not in seen:
                    seen.add(id(param))
                    chosen[f"{module_name}.{name}" if module_name else name] = param
    return chosen


def finetune(loaded, corpus: Corpus | str | None = None, *, steps: int = 50, lr: float = 1e-4, train: str | tuple[str, ...] = "factors",
             window: int = 512, batch_size: int = 1, weight_decay: float = 0.0, clip: float = 1.0,
             evaluate_tokens: int = 0, teacher=None, progress: bool = True) -> dict:
    """Train for ``steps`` steps of ``batch_size`` windows of ``window`` tokens with AdamW; returns a report.

    With ``teacher`` (a model with the same tokenizer), the loss is KL(teacher || student) per token instead of
    next-token cross-entropy. The report has the loss of every step and, when ``evaluate_tokens`` > 0, the perplexity on that many tokens of
    the evaluation text before and after. The model is left in eval mode with every parameter's ``requires_grad``
    as it was.
    """
    from lmshrink.models import load_model

    for name, value, low in (("steps", steps, 1), ("window", window, 2), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InvalidArgument(name, f"{value!r}", f"an integer >= {low}")
    check_number("lr", lr, float, Bounds(0, 1, low_open=True))
    loaded = load_model(loaded)
    if teacher is not None:
        teacher = load_model(teacher)
        if not teacher.causal or teacher.model is loaded.model:
            raise InvalidArgument("teacher", "is not a separate causal language model",
                                  "the uncompressed model (a copy made before compress), or None for next-token loss")
    if not loaded.causal:
        raise InvalidArgument("model", "is not a causal language model", "a model with next-token logits")
    corpus = corpus if isinstance(corpus, Corpus) else load_corpus(corpus)
    if not corpus.train:
        raise InvalidArgument("corpus", f"{corpus.name!r} has no training text", "a corpus with text (TEXT+self trains on TEXT)")
    model = loaded.model
    params = trainable_parameters(model, train)
    if not params:
        raise InvalidArgument("train", f"{train!r} selects no trainable parameters (quantized factors cannot train)",
                              "a model with factorized float layers, train='all', or patterns that match parameter names")
    ids = encode_prefix(loaded, corpus.train, steps * batch_size * window)
    windows = model_windows(loaded, ids, window, steps * batch_size, what=f"training text of {corpus.name}")
    report = {"loss": "next-token" if teacher is None else "distillation (KL to teacher)", "steps": steps, "batch_size": batch_size, "window": window, "lr": lr, "train": train if isinstance(train, str) else list(train),
              "trained_parameters": sum(p.numel() for p in params.values()), "tokens": int(windows.numel()),
              "corpus": corpus.name}
    if evaluate_tokens:
        from lmshrink.evaluate import corpus_perplexity

        report["before"] = corpus_perplexity(loaded, corpus, evaluate_tokens, window, progress=progress)
    flags = {p: p.requires_grad for p in model.parameters()}
    chosen = {id(p) for p in params.values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    optimizer = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=weight_decay)
    losses, start = [], time.perf_counter()
    model.train()
    try:
        for step in tqdm(range(steps), desc="finetune", unit="step", disable=not progress):
            batch = windows[step * batch_size:(step + 1) * batch_size]
            logits = loaded.logits(batch)
            loss = _loss(logits, batch, teacher)
            if not torch.isfinite(loss):
                raise InvalidArgument("lr", f"training diverged: the loss became {loss.item()} at step {step + 1} with lr {lr:g}",
                                      "a smaller learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(list(params.values()), clip)
            optimizer.step()
            diverged = [name for name, p in params.items() if not bool(torch.isfinite(p).all())]
            if diverged:  # caught here, not by a later loss: the last step's weights are what gets saved
                raise InvalidArgument("lr", f"training diverged: step {step + 1} with lr {lr:g} left NaN or inf in "
                                            f"{len(diverged)} parameters ({', '.join(diverged[:3])})", "a smaller learning rate")
            losses.append(loss.item())
            _refresh_caches(model)
    finally:
        model.eval()
        optimizer.zero_grad(set_to_none=True)
        for p, flag in flags.items():
            p.requires_grad_(flag)
    report.update(seconds=time.perf_counter() - start, losses=losses,
                  first_loss=losses[0], last_loss=losses[-1],
                  mean_loss_first_tenth=sum(losses[: max(1, steps // 10)]) / max(1, steps // 10),
                  mean_loss_last_tenth=sum(losses[-max(1, steps // 10):]) / max(1, steps // 10))
    if evaluate_tokens:
        from lmshrink.evaluate import corpus_perplexity

        report["after"] = corpus_perplexity(loaded, corpus, evaluate_tokens, window, progress=progress)
        report["perplexity_change"] = report["after"]["perplexity"] / report["before"]["perplexity"] - 1
    return report


def _loss(logits: torch.Tensor, batch: torch.Tensor, teacher) -> torch.Tensor:
    if teacher is None:
        return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1).to(logits.device))
    with torch.no_grad():
        target = F.log_softmax(teacher.logits(batch).float(), dim=-1).reshape(-1, logits.shape[-1])
    student = F.log_softmax(logits.float(), dim=-1).reshape(-1, logits.shape[-1])
    return F.kl_div(student, target, log_target=True, reduction="batchmean")  # mean over token positions


def _refresh_caches(model: torch.nn.Module) -> None:
    # Layers that cache a derived tensor of their parameters must drop it once the parameters change.
    for module in model.modules():
        if hasattr(module, "clear_cache"):
            module.clear_cache()


def perplexity_from_loss(loss: float) -> float:
    return math.exp(loss)
