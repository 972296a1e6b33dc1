"""Word-level LSTM language models, compatible with PyTorch's word_language_model example.

Vocabulary, corpus and batching follow the example exactly (the vocabulary is built from the train, valid
and test files in that order, one ``<eos>`` per line; ``batchify`` cuts the token stream into B columns;
back-propagation through time over windows of ``bptt`` tokens), so its checkpoints load with the same
word ids. ``RNNModel`` has the example's state-dict keys (``encoder``, ``rnn``, ``decoder``); its LSTM is a
``FactorizedLSTM`` whose W_i / W_h are the compression targets (groups ``W_i`` and ``W_h``).

    from lmshrink.models.lstm import reference_model
    loaded = reference_model("ptb-small")   # trains once (minutes), then loads from the cache
"""

from __future__ import annotations

import json
import math
import pickle
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmshrink.errors import CorruptFile, DataError, InvalidArgument, NotAModel
from lmshrink.layers.base import MAX_DIMENSION
from lmshrink.layers.lstm import FactorizedLSTM
from lmshrink.models import LoadedModel, ModelFamily
from lmshrink.plan import GROUP_ALIASES, Target
from lmshrink.safefiles import check_finite, one_line, read_bounded, resolve_inside

# --targets W_i / W_h / lstm select the LSTM gate matrices of every layer.
GROUP_ALIASES.setdefault("W_i", ("W_i",))
GROUP_ALIASES.setdefault("W_h", ("W_h",))
GROUP_ALIASES.setdefault("lstm", ("W_i", "W_h"))

EOS = "<eos>"
UNK = "<unk>"
VOCAB_FILE = "vocab.json"


# ----------------------------------------------------------------------------------------------- vocabulary


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
        from lmshrink.data import shared_data_dir

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


# ----------------------------------------------------------------------------------------------- model


@dataclass
class LSTMConfig:
    ntoken: int
    ninp: int = 200
    nhid: int = 200
    nlayers: int = 2
    dropout: float = 0.2
    tie_weights: bool = False


class RNNModel(nn.Module):
    """Embedding -> dropout -> multi-layer LSTM -> dropout -> linear decoder, as the example's ``RNNModel``."""

    def __init__(self, ntoken: int, ninp: int = 200, nhid: int = 200, nlayers: int = 2, dropout: float = 0.2,
                 tie_weights: bool = False):
        super().__init__()
        if tie_weights and nhid != ninp:
            raise InvalidArgument("tie_weights", f"needs nhid == ninp, got {nhid} and {ninp}", "equal sizes, or tie_weights=False")
        self.config = LSTMConfig(ntoken, ninp, nhid, nlayers, dropout, tie_weights)
        self.ntoken, self.nhid, self.nlayers, self.rnn_type = ntoken, nhid, nlayers, "LSTM"
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = FactorizedLSTM(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        if tie_weights:
            self.decoder.weight = self.encoder.weight
        # The example's initialisation: uniform(-0.1, 0.1) embedding and decoder, zero decoder bias.
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        if not tie_weights:
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def init_hidden(self, batch_size: int) -> tuple[Tensor, Tensor]:
        weight = self.decoder.bias
        zeros = weight.new_zeros(self.nlayers, batch_size, self.nhid)
        return zeros, zeros.clone()

    def forward(self, input: Tensor, hidden: tuple[Tensor, Tensor] | None = None):
        """(T, B) ids -> (logits (T, B, V), (h, c))."""
        embedded = self.drop(self.encoder(input))
        output, hidden = self.rnn(embedded, hidden)
        return self.decoder(self.drop(output)), hidden


def model_from_state_dict(state: dict[str, Tensor], dropout: float = 0.2) -> RNNModel:
    """An ``RNNModel`` shaped after an example state dict (LSTM only), loaded with it."""
    try:
        ntoken, ninp = state["encoder.weight"].shape
        nhid = state["rnn.weight_hh_l0"].shape[1] if "rnn.weight_hh_l0" in state else state["rnn.hh_l0.weight"].shape[1]
        gates = state["rnn.weight_ih_l0"].shape[0] if "rnn.weight_ih_l0" in state else state["rnn.ih_l0.weight"].shape[0]
    except KeyError as error:
        raise NotAModel(f"MODEL: state dict has no {error.args[0]!r}: not a word_language_model RNNModel "
                        f"(keys: {sorted(state)[:6]})") from error
    except (ValueError, IndexError) as error:  # a tensor of the wrong number of dimensions
        raise NotAModel(f"MODEL: state dict tensors have the wrong number of dimensions for an RNNModel ({error})") from error
    if min(ntoken, ninp, nhid, gates) < 1:
        raise NotAModel(f"MODEL: state dict holds empty tensors (embedding {ntoken}x{ninp}, hidden size {nhid}): not a trained RNNModel")
    if gates != 4 * nhid:
        raise NotAModel(f"MODEL: rnn has {gates} gate rows for hidden size {nhid}: only LSTM checkpoints are supported "
                        f"(4 x hidden rows), not GRU ({3 * nhid}) or plain RNN ({nhid})")
    layer_key = re.compile(r"rnn\.(?:weight_hh_l(\d+)|hh_l(\d+)\.weight)")
    layers = {int(m.group(1) or m.group(2)) for m in map(layer_key.fullmatch, state) if m}
    nlayers = max(layers) + 1
    if nlayers > len(state):  # every layer stores tensors: a larger index is a damaged checkpoint, not a size to build
        raise NotAModel(f"MODEL: state dict names LSTM layer {nlayers - 1} but holds {len(state)} tensors")
    for name, tensor in state.items():
        check_finite(tensor, name, "checkpoint")
    decoder = state.get("decoder.weight")
    tied = bool(decoder is not None and decoder.shape == state["encoder.weight"].shape and torch.equal(decoder, state["encoder.weight"]))
    model = RNNModel(ntoken, ninp, nhid, nlayers, dropout, tie_weights=tied)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise NotAModel(f"MODEL: state dict does not fit an LSTM RNNModel of {nlayers} layers, {ninp} inputs, {nhid} hidden "
                        f"({one_line(error).rstrip(':')})") from error
    return model


def example_state_dict(model: RNNModel) -> dict[str, Tensor]:
    """The model's weights under the example's keys (dense), loadable by its ``model.RNNModel``."""
    state = {"encoder.weight": model.encoder.weight.detach().clone()}
    state.update({f"rnn.{k}": v for k, v in model.rnn.nn_lstm_state_dict().items()})
    state["decoder.weight"] = model.decoder.weight.detach().clone()
    state["decoder.bias"] = model.decoder.bias.detach().clone()
    return state


# ----------------------------------------------------------------------------------------------- train / evaluate


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


# ----------------------------------------------------------------------------------------------- checkpoints


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
    return LoadedModel(model, FAMILIES["word-lstm"], words.vocab, str(path))


# ----------------------------------------------------------------------------------------------- family


class WordLSTMFamily(ModelFamily):
    """Word-level LSTM language models (``RNNModel``); targets are the LSTM's W_i / W_h, the embedding and decoder."""

    name = "word-lstm"
    causal = True

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


from lmshrink.models import FAMILIES  # noqa: E402  (filled by the class definition above)


# ----------------------------------------------------------------------------------------------- reference models


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
    from lmshrink.models.builtin import cache_dir

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
    from lmshrink.io import save

    corpus = load_word_corpus(spec.corpus)
    torch.manual_seed(spec.train.seed)
    model = RNNModel(len(corpus.vocab), spec.ninp, spec.nhid, spec.nlayers, spec.dropout)
    start = time.perf_counter()
    history = train_lm(model, corpus, spec.train, log=log)
    history["finish"] = [train_lm(model, corpus, phase, log=log) for phase in spec.finish]
    history["train_seconds"] = time.perf_counter() - start
    history["threads"] = torch.get_num_threads()
    history["test"] = evaluate_lm(model, corpus.test)
    loaded = LoadedModel(model, FAMILIES["word-lstm"], corpus.vocab, f"word-lstm:{name}")
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
    from lmshrink.io import load

    loaded = load(directory)
    loaded.source = f"word-lstm:{name}"
    return loaded


def reference_corpus(name: str = "ptb-small") -> WordCorpus:
    return load_word_corpus(REFERENCES[name].corpus)


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
