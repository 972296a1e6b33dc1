"""The word-lstm model family: targets (W_i / W_h per layer, embedding, decoder), saving and rebuilding."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmshrink.errors import CorruptFile
from lmshrink.layers.base import MAX_DIMENSION
from lmshrink.models.family import LoadedModel, ModelFamily, register_family
from lmshrink.models.lstm.model import LSTMConfig, RNNModel
from lmshrink.models.lstm.vocab import VOCAB_FILE, Vocabulary
from lmshrink.plan import COMMON_TARGET_GROUPS, Target
from lmshrink.safefiles import one_line, read_bounded, resolve_inside


class WordLSTMFamily(ModelFamily):
    """Word-level LSTM language models (``RNNModel``); targets are the LSTM's W_i / W_h, the embedding and decoder."""

    name = "word-lstm"
    causal = True
    # --targets W_i / W_h / lstm select the LSTM gate matrices of every layer.
    target_groups = {**COMMON_TARGET_GROUPS, "W_i": ("W_i",), "W_h": ("W_h",), "lstm": ("W_i", "W_h")}

    def detect(self, path: Path) -> bool:
        return False  # example checkpoints need their corpus: load them with load_example_checkpoint / `train-lm import`

    def candidates(self, loaded: LoadedModel) -> list[Target]:
        model = loaded.model
        targets = [Target("encoder", model.encoder, "embedding", "embedding", "decoder" if model.config.tie_weights else None)]
        for layer in range(model.rnn.num_layers):
            targets.append(Target(f"rnn.ih_l{layer}", model.rnn.part("ih", layer), "linear", "W_i"))
            targets.append(Target(f"rnn.hh_l{layer}", model.rnn.part("hh", layer), "linear", "W_h"))
        if not model.config.tie_weights:
            targets.append(Target("decoder", model.decoder, "lm_head", "lm_head"))
        # Already-replaced parts are no longer plain modules of the right kind: offer only what is still dense.
        return [t for t in targets if isinstance(t.module, (nn.Linear, nn.Embedding))]

    def encode(self, loaded: LoadedModel, text: str) -> list[int]:
        return loaded.tokenizer.encode(text)

    def logits(self, loaded: LoadedModel, ids: Tensor) -> Tensor:
        logits, _ = loaded.model(ids.t())
        return logits.transpose(0, 1)

    def untie_head(self, loaded: LoadedModel) -> None:
        loaded.model.config.tie_weights = False

    def save_base(self, loaded: LoadedModel, directory: Path) -> dict[str, Any]:
        (directory / VOCAB_FILE).write_text(loaded.tokenizer.to_json())
        return {"lstm": asdict(loaded.model.config), "vocab": VOCAB_FILE}

    def build_empty(self, directory: Path, base: dict[str, Any], stored: dict | None = None) -> LoadedModel:
        config = _checked_lstm_config(directory, base, stored)
        vocab_path = resolve_inside(directory, base.get("vocab", VOCAB_FILE), "vocabulary file")
        words = _read_vocabulary(vocab_path)
        vocab = Vocabulary(words)
        if len(vocab) != len(words) or len(vocab) != config.ntoken:
            raise CorruptFile(f"MODEL: vocabulary {str(vocab_path)!r} has {len(vocab)} distinct words of {len(words)}, "
                              f"the model {config.ntoken}; allowed: one distinct word per embedding row")
        with torch.device("meta"):
            model = RNNModel(**asdict(config))
        model.eval()
        return LoadedModel(model, self, vocab, str(directory))


def _checked_lstm_config(directory: Path, base: dict[str, Any], stored: dict | None) -> LSTMConfig:
    """The manifest's LSTM sizes, checked for types and ranges (and layers against the stored tensors)."""
    lstm = base.get("lstm")
    where = f"MODEL: manifest in {str(directory)!r}: base 'lstm'"
    if not isinstance(lstm, dict) or set(lstm) - set(LSTMConfig.__dataclass_fields__) or "ntoken" not in lstm:
        raise CorruptFile(f"{where} is {str(lstm)[:80]}; allowed: an object with {', '.join(LSTMConfig.__dataclass_fields__)}")
    config = LSTMConfig(**lstm)
    for key in ("ntoken", "ninp", "nhid", "nlayers"):
        value = getattr(config, key)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_DIMENSION:
            raise CorruptFile(f"{where} {key!r} is {value!r}; allowed: a positive integer")
    if isinstance(config.dropout, bool) or not isinstance(config.dropout, (int, float)) or not 0 <= config.dropout < 1:
        raise CorruptFile(f"{where} 'dropout' is {config.dropout!r}; allowed: a number in [0, 1)")
    if not isinstance(config.tie_weights, bool) or config.tie_weights and config.ninp != config.nhid:
        raise CorruptFile(f"{where} 'tie_weights' is {config.tie_weights!r} (ninp {config.ninp}, nhid {config.nhid}); "
                          "allowed: false, or true with ninp == nhid")
    if stored is not None and config.nlayers > len(stored):
        raise CorruptFile(f"{where} 'nlayers' is {config.nlayers:,} for {len(stored)} stored tensors; allowed: a config matching its weights")
    return config


def _read_vocabulary(path: Path) -> list[str]:
    """The saved vocabulary: a JSON list of words, read from a regular file inside the model directory."""
    try:
        words = json.loads(read_bounded(path, "vocabulary file").decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise CorruptFile(f"MODEL: vocabulary {str(path)!r} is not a JSON list of words ({one_line(error)})") from error
    if not isinstance(words, list) or not all(isinstance(word, str) for word in words):
        raise CorruptFile(f"MODEL: vocabulary {str(path)!r} is not a JSON list of words")
    return words


WORD_LSTM = register_family(WordLSTMFamily())
