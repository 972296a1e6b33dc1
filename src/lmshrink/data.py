"""Text corpora and the token windows cut from them (deterministic: same text, same windows)."""

from __future__ import annotations

import os
import sys
import sysconfig
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lmshrink.errors import DataError, InvalidArgument

# Named corpora resolve inside the shared data folder (LMSHRINK_DATA, else ../shared/data from here upwards).
# 'pydoc' and 'stdlib' need no folder: every CPython carries them.
NAMED_CORPORA = {"wikitext-2": ("wikitext-2", "train.txt", "test.txt"), "ptb": ("ptb", "ptb.train.txt", "ptb.test.txt")}


@dataclass
class Corpus:
    """Calibration text (``train``) and evaluation text (``test``) with a description of where they came from."""

    name: str
    train: str
    test: str
    source: str
    sampled: float = 0.0  # the share of calibration windows sampled from the model itself (lmshrink.self_samples)


def shared_data_dir() -> Path | None:
    """LMSHRINK_DATA if set, else the first ``shared/data`` found beside the working directory or this checkout."""
    if os.environ.get("LMSHRINK_DATA"):
        return Path(os.environ["LMSHRINK_DATA"]).expanduser()
    for start in (Path.cwd(), Path(__file__).resolve()):
        for folder in [start, *start.parents]:
            candidate = folder / "shared" / "data"
            if candidate.is_dir():
                return candidate
    return None


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _split_file(path: Path, name: str) -> Corpus:
    # One file: the first 90% (at a line break) calibrates, the last 10% evaluates; they never overlap.
    text = _read(path)
    cut = text.rfind("\n", 0, int(len(text) * 0.9)) + 1 or int(len(text) * 0.9)
    return Corpus(name, text[:cut], text[cut:], f"{path} (first 90% for calibration, last 10% for evaluation)")


def _from_folder(path: Path) -> Corpus:
    files = sorted(p for p in path.iterdir() if p.is_file())
    train = [p for p in files if "train" in p.name]
    test = [p for p in files if "test" in p.name]
    if not train or not test:
        raise InvalidArgument("--data", f"folder {str(path)!r} has no train and test files",
                              "a text file, or a folder with *train* and *test* files (as WikiText-2 and PTB have)")
    return Corpus(path.name, _read(train[0]), _read(test[0]), f"{train[0]} (calibration), {test[0]} (evaluation)")


def stdlib_corpus(max_chars: int = 3_000_000) -> Corpus:
    """Python's own standard library source: real text that every machine with Python has."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for file in sorted(root.glob("*.py")):
        text = _read(file)
        parts.append(text)
        size += len(text)
        if size >= max_chars:
            break
    text = "\n".join(parts)
    cut = text.rfind("\n", 0, int(len(text) * 0.9)) + 1
    return Corpus("python-stdlib", text[:cut], text[cut:],
                  f"Python standard library source ({root}/*.py, first {size:,} characters; 90% calibration / 10% evaluation)")


def pydoc_corpus() -> Corpus:
    """English prose that every CPython carries: the reference manual's topics that ``help()`` shows (pydoc_data).

    No network and no download, so tests and the default job run on English prose on any machine. The topics
    are joined in sorted order and split at a topic boundary: the first 90% of the characters calibrate, the
    rest (other topics) evaluate. The text follows the Python version (3.11: 79 topics, 465k characters).
    """
    from pydoc_data.topics import topics

    parts = [topics[key].strip() + "\n" for key in sorted(topics)]
    text = "\n".join(parts)
    cut, size = 0, 0
    for part in parts:  # the last topic boundary before 90% of the text
        if size + len(part) + 1 > 0.9 * len(text):
            break
        size += len(part) + 1
        cut = size
    version = ".".join(map(str, sys.version_info[:2]))
    return Corpus("pydoc", text[:cut], text[cut:],
                  f"Python {version} reference manual topics (pydoc_data.topics: {len(parts)} topics, {len(text):,} characters of "
                  f"English prose; 90% calibration / 10% evaluation)")


def reference_text() -> str:
    """The calibration halves of 'pydoc' and 'stdlib': prose and code that every machine has. Its token counts stand
    beside a calibration text's where a rarely used token must not mean a token most text needs (gptq's rare rows):
    a corpus in a peculiar format (WikiText-2 has no bare newline, nor punctuation without a space before it) never
    uses tokens that ordinary prose and code use all the time."""
    return pydoc_corpus().train + "\n" + stdlib_corpus().train


def default_corpus_name() -> str:
    """'wikitext-2' when the shared data folder has it, else 'pydoc' (English prose on every machine)."""
    shared = shared_data_dir()
    return "wikitext-2" if shared is not None and (shared / "wikitext-2").is_dir() else "pydoc"


SELF = "self"
DATA_CHOICES = "a text file, a folder with train/test files, 'wikitext-2', 'ptb', 'pydoc', 'stdlib', or any of them +self"


def load_corpus(spec: str | Path | None = None) -> Corpus:
    """A text file, a folder with train/test files, a named corpus ('wikitext-2', 'ptb', 'pydoc', 'stdlib'), or the default;
    ``TEXT+self`` calibrates half on that text and half on text the model samples itself, ``self`` only on the latter
    (it has no evaluation text).

    The default is WikiText-2 from the shared data folder when there is one, else 'pydoc': English prose from
    Python's own reference manual. 'stdlib' is the standard library's source code (code, not prose).
    """
    if spec is None:
        spec = default_corpus_name()
    text = str(spec)
    if text == SELF:
        return Corpus(SELF, "", "", "text sampled from the model itself (calibration only)", sampled=1.0)
    if text.endswith("+" + SELF) and not Path(text).expanduser().exists():
        base = load_corpus(text[: -len(SELF) - 1])
        return Corpus(f"{base.name}+{SELF}", base.train, base.test,
                      f"{base.source}; half of the calibration windows sampled from the model itself", sampled=0.5)
    if text == "stdlib":
        return stdlib_corpus()
    if text == "pydoc":
        return pydoc_corpus()
    if text in NAMED_CORPORA:
        shared = shared_data_dir()
        folder = shared / NAMED_CORPORA[text][0] if shared is not None else None
        if folder is None or not folder.is_dir():
            raise InvalidArgument("--data", f"named corpus {text!r} not found (no shared data folder)",
                                  "set LMSHRINK_DATA to the folder holding wikitext-2/ and ptb/, or pass a path")
        return _from_folder(folder)
    path = Path(text).expanduser()
    if path.is_dir():
        return _from_folder(path)
    if path.is_file():
        return _split_file(path, path.stem)
    raise InvalidArgument("--data", f"{text!r} does not exist", DATA_CHOICES)


def encode_prefix(loaded, text: str, tokens: int | None, chars_per_token: int = 8) -> list[int]:
    """Token ids of the start of ``text``, at least ``tokens`` of them when the text has that many.

    Tokenizing a whole 10 MB corpus to use its first windows wastes seconds; this grows a prefix instead.
    """
    if tokens is None:
        return loaded.encode(text)
    size = tokens * chars_per_token
    while True:
        ids = loaded.encode(text[:size])
        if len(ids) > tokens or size >= len(text):
            # Strictly more tokens than asked were made, so a partial word at the cut is never returned.
            return ids[:tokens]
        size *= 2


def token_windows(ids: list[int] | torch.Tensor, window: int, count: int | None = None, what: str = "text") -> torch.Tensor:
    """Non-overlapping windows (count, window) from the start of ``ids``; an error if not even one fits."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    available = ids.numel() // window
    if available == 0:
        raise DataError(f"--data: the {what} has {ids.numel()} tokens, too short for one window of {window}; "
                        f"give a longer text or a smaller --window")
    if count is not None and count > available:
        raise DataError(f"--data: the {what} has {ids.numel()} tokens, enough for {available} windows of {window}, "
                        f"not the {count} asked; give a longer text or fewer windows")
    used = available if count is None else count
    return ids[: used * window].view(used, window)


def model_windows(loaded, ids: list[int] | torch.Tensor, window: int, count: int | None = None, what: str = "text") -> torch.Tensor:
    """Windows of ``window`` tokens as the model reads text: when it starts every sequence with a BOS (its tokenizer
    prepends one), each window is that token followed by ``window - 1`` tokens of ``ids``; else ``token_windows``."""
    leading = loaded.leading_token
    if leading is None:
        return token_windows(ids, window, count, what)
    text = token_windows(ids, window - 1, count, what)
    return torch.cat([torch.full((text.shape[0], 1), leading, dtype=text.dtype), text], dim=1)


def with_self_share(data: Corpus | str | Path | None, share: float | None) -> Corpus:
    """The calibration corpus: ``data`` (a Corpus, or what load_corpus takes) with ``share`` of its calibration windows
    sampled from the model itself (None: as the data says)."""
    corpus = data if isinstance(data, Corpus) else load_corpus(data)
    if share is None or share == corpus.sampled:
        return corpus
    if not corpus.train:
        raise InvalidArgument("--self-share", f"{share:g} leaves windows to text, but --data {corpus.name!r} has none (all sampled)",
                              "no --self-share (or 1) with --data self, or TEXT+self / a text with --self-share")
    base = corpus.name[: -len(SELF) - 1] if corpus.name.endswith("+" + SELF) else corpus.name
    return replace(corpus, name=base if share == 0 else f"{base}+{SELF}:{share:g}", sampled=float(share),
                   source=corpus.source if share == 0 else f"{corpus.source}; {share:g} of the calibration windows sampled from the model itself")


def calibration_windows(loaded, corpus: Corpus, count: int, window: int) -> torch.Tensor:
    """The first ``count`` windows of the corpus's calibration text (see ``model_windows``), then, for a corpus with
    a ``sampled`` share, that share of the windows sampled from the model itself (lmshrink.self_samples)."""
    sampled = int(count * corpus.sampled)  # the text gets the odd window
    parts = []
    if count > sampled:
        ids = encode_prefix(loaded, corpus.train, (count - sampled) * window)
        parts.append(model_windows(loaded, ids, window, count - sampled, what=f"calibration text of {corpus.name}"))
    if sampled:
        from lmshrink.self_samples import sampled_windows

        parts.append(sampled_windows(loaded, sampled, window))
    return torch.cat(parts)
