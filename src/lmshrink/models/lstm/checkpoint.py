"""Checkpoints of the word_language_model example (state dicts; whole pickled models only on request)."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import Tensor, nn

from lmshrink.errors import CorruptFile, DataError, InvalidArgument, NotAModel
from lmshrink.models.family import LoadedModel
from lmshrink.models.lstm.corpus import load_word_corpus
from lmshrink.models.lstm.family import WORD_LSTM
from lmshrink.models.lstm.model import model_from_state_dict
from lmshrink.safefiles import one_line


class _PickledRNNModel(nn.Module):
    """Stands in for the example's ``model.RNNModel`` class while unpickling a whole saved model."""


class _ExampleUnpickler(pickle.Unpickler):
    # Only the example's own model class is redirected; everything else resolves as usual (which is why
    # unpickling stays behind an explicit opt-in: it can still run arbitrary code from the file).
    def find_class(self, module, name):
        if name == "RNNModel":
            return _PickledRNNModel
        return super().find_class(module, name)


class _ExamplePickleModule:
    Unpickler = _ExampleUnpickler
    load = pickle.load
    __name__ = "lmshrink_example_pickle"


def read_example_checkpoint(path: str | Path, allow_pickle: bool = False) -> tuple[dict[str, Tensor], float]:
    """(state dict, dropout) of a word_language_model checkpoint: a state dict, or a whole pickled model.

    A whole model (what the example's ``main.py --save`` writes) can only be read by unpickling, which runs
    code from the file; that needs ``allow_pickle=True``. State dicts load with ``weights_only=True``.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise NotAModel(f"CHECKPOINT: {str(path)!r} is not a file")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if not allow_pickle:
            raise InvalidArgument(
                "CHECKPOINT", f"{str(path)!r} is a whole pickled model, not a state dict: loading it would unpickle "
                "and so run code stored in the file",
                "a state dict (torch.save(model.state_dict(), path)), or --allow-pickle / allow_pickle=True if you trust the file") from error
        content = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_ExamplePickleModule)
    except Exception as error:  # noqa: BLE001 - torch.load fails on a damaged file with many types (IndexError when empty)
        raise NotAModel(f"CHECKPOINT: {str(path)!r} is not a torch checkpoint ({one_line(error)})") from error
    dropout = 0.2
    if isinstance(content, nn.Module):
        if getattr(content, "rnn_type", "LSTM") != "LSTM":
            raise NotAModel(f"CHECKPOINT: {str(path)!r} holds a {content.rnn_type} model; only LSTM models are supported")
        drop = getattr(content, "drop", None)
        dropout = float(getattr(drop, "p", dropout))
        content = content.state_dict()
    if not isinstance(content, dict) or not all(isinstance(v, Tensor) for v in content.values()):
        raise NotAModel(f"CHECKPOINT: {str(path)!r} holds {type(content).__name__}, not a state dict of tensors")
    return content, dropout


def load_example_checkpoint(path: str | Path, corpus: str | Path, allow_pickle: bool = False) -> LoadedModel:
    """A word_language_model checkpoint with its vocabulary rebuilt from ``corpus`` as the example builds it."""
    state, dropout = read_example_checkpoint(path, allow_pickle)
    words = load_word_corpus(corpus)
    rows, bias = state.get("encoder.weight"), state.get("decoder.bias")
    if rows is None or rows.dim() != 2 or bias is None or bias.dim() != 1:
        raise NotAModel(f"CHECKPOINT: {str(path)!r} has no 2-D 'encoder.weight' and 1-D 'decoder.bias' "
                        f"(keys: {sorted(state)[:6]}): not a word_language_model RNNModel")
    if rows.shape[0] != len(words.vocab) or bias.shape[0] != len(words.vocab):
        found = rows.shape[0]
        raise DataError(f"CHECKPOINT: {str(path)!r} has an embedding of {found} words but corpus {words.name!r} "
                        f"({words.source}) builds a vocabulary of {len(words.vocab)}: give the corpus the model was trained on")
    try:
        model = model_from_state_dict(state, dropout)
    except (NotAModel, CorruptFile) as error:
        raise NotAModel(f"CHECKPOINT: {str(path)!r}: {str(error).removeprefix('MODEL: ')}") from error
    model.eval()
    return LoadedModel(model, WORD_LSTM, words.vocab, str(path))
