"""Reference word-level LSTM LMs (REFERENCES): trained once into the cache, then loaded from it."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from lmshrink.cache import cache_dir
from lmshrink.errors import InvalidArgument, NotAModel
from lmshrink.io import load, save
from lmshrink.models.family import LoadedModel
from lmshrink.models.lstm.corpus import WordCorpus, load_word_corpus
from lmshrink.models.lstm.family import WORD_LSTM
from lmshrink.models.lstm.model import RNNModel
from lmshrink.models.lstm.train import TrainConfig, evaluate_lm, train_lm


@dataclass(frozen=True)
class ReferenceSpec:
    corpus: str
    ninp: int
    nhid: int
    nlayers: int
    dropout: float
    train: TrainConfig = field(default_factory=TrainConfig)
    description: str = ""
    # Phases run after ``train``, each from the weights the previous one kept: lower learning rates, the steps
    # the example's annealing takes after many more epochs than fit here. Without them a short run ends at
    # lr 20 with noisy weights that any further low-lr training improves, which confounds fine-tuning results.
    finish: tuple[TrainConfig, ...] = ()


# Epochs are set by what 2 shared CPU cores allow (1 thread: PTB 2x200 about 10 minutes an epoch, PTB 2x400
# about 11, WikiText-2 2x200 about 80); these models are references for compression, not state of the art.
REFERENCES: dict[str, ReferenceSpec] = {
    "ptb-small": ReferenceSpec("ptb", 200, 200, 2, 0.2, TrainConfig(epochs=1, batch_size=20, lr=20.0),
                               "2x200 LSTM on PTB, 1 epoch of the example's recipe"),
    "ptb-medium": ReferenceSpec("ptb", 400, 400, 2, 0.3, TrainConfig(epochs=2, batch_size=20, lr=20.0),
                                "2x400 LSTM on PTB, 2 epochs of the example's recipe, then half an epoch at lr 5 "
                                "and half an epoch at lr 1.25",
                                finish=(TrainConfig(epochs=0.5, lr=5.0), TrainConfig(epochs=0.5, lr=1.25))),
    "wt2-small": ReferenceSpec("wikitext-2", 200, 200, 2, 0.2, TrainConfig(epochs=0.5, batch_size=20, lr=20.0),
                               "2x200 LSTM on WikiText-2, half an epoch (under-trained: the time available)"),
}


def reference_dir(name: str) -> Path:
    return cache_dir() / "word-lstm" / name


def train_reference(name: str, log: Callable[[str], None] | None = None, overwrite: bool = False) -> Path:
    """Train reference model ``name`` from REFERENCES and save it (lmshrink format) under the cache dir."""
    if name not in REFERENCES:
        raise InvalidArgument("name", f"unknown reference model {name!r}", ", ".join(REFERENCES))
    spec = REFERENCES[name]
    import fcntl

    lock = reference_dir(name).with_name(f".{name}.training")
    lock.parent.mkdir(parents=True, exist_ok=True)
    # An fcntl lock dies with its process: a killed run never blocks the next one.
    with open(lock, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            # Another process is training it: wait for its result instead of training twice.
            if log is not None:
                log(f"another process is training {name!r}; waiting for it to finish")
            fcntl.flock(handle, fcntl.LOCK_EX)
            if (reference_dir(name) / "lmshrink.json").is_file():
                return reference_dir(name)
        return _train_reference(name, spec, log)


def _train_reference(name: str, spec: ReferenceSpec, log) -> Path:
    corpus = load_word_corpus(spec.corpus)
    torch.manual_seed(spec.train.seed)
    model = RNNModel(len(corpus.vocab), spec.ninp, spec.nhid, spec.nlayers, spec.dropout)
    start = time.perf_counter()
    history = train_lm(model, corpus, spec.train, log=log)
    history["finish"] = [train_lm(model, corpus, phase, log=log) for phase in spec.finish]
    history["train_seconds"] = time.perf_counter() - start
    history["threads"] = torch.get_num_threads()
    history["test"] = evaluate_lm(model, corpus.test)
    loaded = LoadedModel(model, WORD_LSTM, corpus.vocab, f"word-lstm:{name}")
    target = save(loaded, reference_dir(name), overwrite=True)
    (target / "training.json").write_text(json.dumps(history, indent=2) + "\n")
    return target


def reference_model(name: str = "ptb-small", train: bool = True, log: Callable[[str], None] | None = None) -> LoadedModel:
    """The cached reference model ``name`` (see REFERENCES), training it first if it is missing and ``train``."""
    if name not in REFERENCES:
        raise InvalidArgument("name", f"unknown reference model {name!r}", ", ".join(REFERENCES))
    directory = reference_dir(name)
    if not (directory / "lmshrink.json").is_file():
        if not train:
            raise NotAModel(f"MODEL: reference model {name!r} is not trained yet; run `lmshrink train-lm {name}`")
        train_reference(name, log=log)
    loaded = load(directory)
    loaded.source = f"word-lstm:{name}"
    return loaded


def reference_corpus(name: str = "ptb-small") -> WordCorpus:
    return load_word_corpus(REFERENCES[name].corpus)
