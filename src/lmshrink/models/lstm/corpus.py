"""Corpora of the word_language_model example: train/valid/test token streams, batchify, BPTT windows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lmshrink.data import shared_data_dir
from lmshrink.errors import DataError, InvalidArgument
from lmshrink.models.lstm.vocab import Vocabulary


@dataclass
class WordCorpus:
    """Token-id streams of a corpus's train / valid / test files and the vocabulary built from all three."""

    name: str
    vocab: Vocabulary
    train: Tensor
    valid: Tensor
    test: Tensor
    source: str


def _corpus_files(folder: Path) -> dict[str, Path]:
    files = {}
    for split in ("train", "valid", "test"):
        found = sorted(p for p in folder.iterdir() if p.is_file() and split in p.name and p.suffix in (".txt", ".tokens"))
        if not found:
            raise InvalidArgument("corpus", f"folder {str(folder)!r} has no *{split}* text file",
                                  "a folder with train, valid and test .txt files (as the example's data/wikitext-2), or 'ptb' / 'wikitext-2'")
        files[split] = found[0]
    return files


def _corpus_folder(spec: str | Path) -> Path:
    text = str(spec)
    if text in ("ptb", "wikitext-2", "wt2"):
        shared = shared_data_dir()
        folder = shared / ("ptb" if text == "ptb" else "wikitext-2") if shared is not None else None
        if folder is None or not folder.is_dir():
            raise InvalidArgument("corpus", f"named corpus {text!r} not found (no shared data folder)",
                                  "set LMSHRINK_DATA to the folder holding ptb/ and wikitext-2/, or pass a folder")
        return folder
    folder = Path(text).expanduser()
    if not folder.is_dir():
        raise InvalidArgument("corpus", f"{text!r} is not a folder", "'ptb', 'wikitext-2', or a folder with train/valid/test .txt files")
    return folder


_CORPUS_CACHE: dict[str, WordCorpus] = {}


def load_word_corpus(spec: str | Path) -> WordCorpus:
    """The example's ``data.Corpus``: vocabulary grown over train, valid, test (in that order), ids as LongTensors."""
    folder = _corpus_folder(spec).resolve()
    key = str(folder)
    if key not in _CORPUS_CACHE:
        files = _corpus_files(folder)
        vocab = Vocabulary()
        streams = {}
        for split in ("train", "valid", "test"):
            text = files[split].read_text(encoding="utf-8")
            if text and not text.endswith("\n"):
                text += "\n"  # the example reads line by line: the last line gets its <eos> too
            streams[split] = torch.tensor(vocab.encode(text, grow=True), dtype=torch.long)
        name = "ptb" if str(spec) == "ptb" else "wikitext-2" if str(spec) in ("wikitext-2", "wt2") else folder.name
        _CORPUS_CACHE[key] = WordCorpus(name, vocab, streams["train"], streams["valid"], streams["test"], key)
    return _CORPUS_CACHE[key]


def batchify(data: Tensor, batch_size: int, bptt: int | None = None, what: str = "data") -> Tensor:
    """(N,) ids -> (N // B, B): B parallel streams, the tail that does not fill a row dropped (as the example)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidArgument("batch_size", f"{batch_size!r} is not a positive integer", "an integer >= 1")
    rows = data.numel() // batch_size
    needed = 2 if bptt is None else bptt + 1
    if rows < needed:
        raise DataError(f"{what}: {data.numel()} tokens give {rows} steps per stream at batch size {batch_size}, "
                        f"fewer than one BPTT batch needs ({needed} = bptt + 1); give more text or a smaller batch size / bptt")
    return data[: rows * batch_size].view(batch_size, rows).t().contiguous()


def get_batch(source: Tensor, start: int, bptt: int) -> tuple[Tensor, Tensor]:
    """Inputs (T, B) and flattened next-token targets (T*B,) for the window starting at ``start``."""
    length = min(bptt, source.shape[0] - 1 - start)
    return source[start:start + length], source[start + 1:start + 1 + length].reshape(-1)
