"""Token frequencies for frequency-aware compression (GroupReduce): counted with the model's own tokenizer.

A ``Frequencies`` table holds one raw count per vocabulary entry, where it came from, and the add-``smoothing``
constant that gives unseen tokens a small positive weight. It serializes to a compact JSON-safe dict (zlib +
base64 counts) that compressed layers keep in their config, so a saved model says exactly which table made it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lmshrink.errors import CorruptFile, InvalidArgument


@dataclass
class Frequencies:
    counts: Tensor  # (V,) int64 raw counts
    source: str
    smoothing: float = 1.0

    @property
    def vocab_size(self) -> int:
        return int(self.counts.numel())

    @property
    def tokens(self) -> int:
        return int(self.counts.sum())

    def smoothed(self) -> Tensor:
        """Counts plus ``smoothing`` (float64): every token positive, unseen ones smallest."""
        return self.counts.double() + self.smoothing

    def check_vocab(self, vocab_size: int, argument: str = "frequencies") -> "Frequencies":
        if self.vocab_size != vocab_size:
            raise InvalidArgument(argument, f"table has {self.vocab_size} entries ({self.source}) but the matrix has {vocab_size} rows",
                                  "a frequency table made with this model's tokenizer (one count per vocabulary entry)")
        return self

    def digest(self) -> str:
        return hashlib.sha256(self.counts.to(torch.int64).numpy().tobytes()).hexdigest()[:16]

    def to_dict(self) -> dict:
        raw = zlib.compress(self.counts.to(torch.int64).numpy().tobytes(), 9)
        return {"source": self.source, "smoothing": self.smoothing, "vocab_size": self.vocab_size, "tokens": self.tokens,
                "sha256_16": self.digest(), "counts_zlib_b64": base64.b64encode(raw).decode("ascii")}

    @classmethod
    def from_dict(cls, data: dict) -> "Frequencies":
        import numpy as np

        try:
            raw = zlib.decompress(base64.b64decode(data["counts_zlib_b64"]))
            counts = torch.from_numpy(np.frombuffer(raw, dtype=np.int64).copy())
        except (KeyError, ValueError, zlib.error) as error:
            raise CorruptFile(f"frequency table is unreadable: {error}") from error
        if counts.numel() != data.get("vocab_size", counts.numel()):
            raise CorruptFile(f"frequency table says {data.get('vocab_size')} entries but holds {counts.numel()}")
        return cls(counts, data.get("source", "?"), float(data.get("smoothing", 1.0)))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict()) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Frequencies":
        path = Path(path).expanduser()
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise InvalidArgument("--frequencies", f"{str(path)!r} is not a readable frequency table ({error})",
                                  "a JSON file written by Frequencies.save") from error
        return cls.from_dict(data)


def count_tokens(ids, vocab_size: int, source: str = "<ids>", smoothing: float = 1.0) -> Frequencies:
    """Counts of each id in ``ids``; an id outside [0, vocab_size) is an error (wrong vocabulary)."""
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    if smoothing < 0:
        raise InvalidArgument("smoothing", f"{smoothing} is negative", "a number >= 0 added to every count")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise InvalidArgument("ids", f"token ids span [{int(ids.min())}, {int(ids.max())}]", f"ids in [0, {vocab_size}) of this vocabulary")
    return Frequencies(torch.bincount(ids, minlength=vocab_size), source, smoothing)


_MEMORY: dict[tuple, Frequencies] = {}


def corpus_frequencies(loaded, text: str, vocab_size: int, *, name: str = "text", max_tokens: int | None = 4_000_000,
                       smoothing: float = 1.0) -> Frequencies:
    """Token counts of ``text`` (its first ``max_tokens`` tokens) under the model's own tokenizer.

    Tokenized in line-aligned pieces of ~1 MB so long corpora do not need one huge call; remembered per process.
    """
    key = (id(loaded.tokenizer), hashlib.sha256(text.encode("utf-8", "replace")).hexdigest(), vocab_size, max_tokens, smoothing)
    if key in _MEMORY:
        return _MEMORY[key]
    counts = torch.zeros(vocab_size, dtype=torch.long)
    used, start, piece = 0, 0, 1 << 20
    while start < len(text) and (max_tokens is None or used < max_tokens):
        end = text.find("\n", start + piece)
        end = len(text) if end < 0 else end + 1
        ids = torch.as_tensor(loaded.encode(text[start:end]), dtype=torch.long)
        if max_tokens is not None:
            ids = ids[: max_tokens - used]
        counts += count_tokens(ids, vocab_size).counts
        used += ids.numel()
        start = end
    if used == 0:
        raise InvalidArgument("--data", f"the text of {name} has no tokens", "a non-empty calibration text")
    table = Frequencies(counts, f"{name}: first {used:,} tokens", smoothing)
    _MEMORY[key] = table
    return table
