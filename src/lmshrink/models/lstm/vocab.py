"""The vocabulary of a word-level LSTM LM: words <-> ids as the word_language_model example's ``Dictionary``."""

from __future__ import annotations

import json

from lmshrink.errors import DataError

EOS = "<eos>"
UNK = "<unk>"
VOCAB_FILE = "vocab.json"


class Vocabulary:
    """Words <-> ids in order of first appearance, as the example's ``Dictionary``."""

    def __init__(self, words: list[str] | None = None):
        self.idx2word: list[str] = []
        self.word2idx: dict[str, int] = {}
        for word in words or []:
            self.add_word(word)

    def add_word(self, word: str) -> int:
        if word not in self.word2idx:
            self.word2idx[word] = len(self.idx2word)
            self.idx2word.append(word)
        return self.word2idx[word]

    def __len__(self) -> int:
        return len(self.idx2word)

    @property
    def vocab_size(self) -> int:
        return len(self)

    def encode(self, text: str, grow: bool = False) -> list[int]:
        """Ids of ``text``: words split on whitespace, ``<eos>`` after every complete line.

        Unknown words map to ``<unk>`` when the vocabulary has it; otherwise they are an error.
        A last line without a newline gets no ``<eos>`` (it may be a prefix cut mid-line).
        """
        ids: list[int] = []
        unk = self.word2idx.get(UNK)
        lines = text.split("\n")
        for number, line in enumerate(lines):
            words = line.split()
            if number < len(lines) - 1:
                words.append(EOS)
            for word in words:
                index = self.add_word(word) if grow else self.word2idx.get(word, unk)
                if index is None:
                    raise DataError(f"text: word {word!r} is not in the vocabulary ({len(self)} words, no {UNK!r}); "
                                    "use text from the corpus the model was trained on")
                ids.append(index)
        return ids

    def decode(self, ids) -> str:
        return " ".join(self.idx2word[int(i)] for i in ids)

    def to_json(self) -> str:
        return json.dumps(self.idx2word)

    @classmethod
    def from_json(cls, text: str) -> "Vocabulary":
        return cls(json.loads(text))
