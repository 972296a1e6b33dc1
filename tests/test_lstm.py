"""Word-level LSTM LMs (models/lstm.py), the factorized LSTM (layers/lstm.py), and compressing them."""

from __future__ import annotations

import contextlib
import copy
import re

import pytest
import torch
from torch import nn

import lmshrink
from conftest import require_shared
from lmshrink.errors import DataError, InvalidArgument
from lmshrink.layers.lowrank import LowRankLinear
from lmshrink.layers.lstm import FactorizedLSTM, PrunedLinear
from lmshrink.models import FAMILIES, LoadedModel
from lmshrink.models.lstm import RNNModel as WordLSTM
from lmshrink.models.lstm import (
    TrainConfig,
    Vocabulary,
    batchify,
    evaluate_lm,
    example_state_dict,
    finetune_lm,
    get_batch,
    load_example_checkpoint,
    load_word_corpus,
    train_lm,
)


@contextlib.contextmanager
def threads(count: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models: a second thread only adds synchronisation, which is very slow (10x) on busy shared cores.
    with threads(1):
        yield


class RNNModel(nn.Module):
    """The layout of PyTorch's word_language_model ``RNNModel`` (LSTM): encoder, rnn, decoder, drop.

    Named like the example's class, because a whole pickled model refers to its class by name."""

    def __init__(self, ntoken, ninp, nhid, nlayers, dropout=0.2):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        self.rnn_type, self.nhid, self.nlayers = "LSTM", nhid, nlayers

    def forward(self, input, hidden=None):
        output, hidden = self.rnn(self.drop(self.encoder(input)), hidden)
        return self.decoder(self.drop(output)), hidden


@pytest.fixture(scope="module")
def tiny_corpus_dir(tmp_path_factory, prose):
    """English prose (pydoc) in PTB's style: lowercase words, one sentence-ish line each; a small vocabulary,
    seconds to train on."""
    folder = tmp_path_factory.mktemp("prose-words")
    lines = [" ".join(words) + "\n" for line in prose.train.splitlines()
             if len(words := re.findall(r"[a-z]+", line.lower())) >= 4]
    # Every 12th line validates and the next tests, so all three splits read the same topics.
    for split, keep in (("train", lambda i: i % 12 < 10), ("valid", lambda i: i % 12 == 10), ("test", lambda i: i % 12 == 11)):
        (folder / f"{split}.txt").write_text("".join(line for i, line in enumerate(lines[:3600]) if keep(i)))
    return folder


@pytest.fixture(scope="module")
def tiny_trained(tiny_corpus_dir):
    corpus = load_word_corpus(tiny_corpus_dir)
    torch.manual_seed(0)
    model = WordLSTM(len(corpus.vocab), 32, 32, 2, dropout=0.0)
    with threads(1):  # module fixtures run before the autouse one
        history = train_lm(model, corpus, TrainConfig(epochs=2, batch_size=10, bptt=20, lr=20.0, seed=0))
    return LoadedModel(model, FAMILIES["word-lstm"], corpus.vocab, "tiny"), corpus, history


def _copy(loaded):
    return LoadedModel(copy.deepcopy(loaded.model), loaded.family, loaded.tokenizer, loaded.source)


def test_vocabulary_is_built_like_the_example():
    data_dir = require_shared("checks PTB's and WikiText-2's published vocabulary sizes (10000, 33278)")
    corpus = load_word_corpus("ptb")
    assert len(corpus.vocab) == 10000  # PTB's published vocabulary, <eos> included
    train_lines = (data_dir / "ptb" / "ptb.train.txt").read_text().splitlines()
    assert corpus.train.numel() == sum(len(line.split()) + 1 for line in train_lines)
    first_words = train_lines[0].split()
    assert corpus.vocab.decode(corpus.train[: len(first_words)]) == " ".join(first_words)
    assert corpus.vocab.idx2word[: len(set(first_words))] == list(dict.fromkeys(first_words))  # first-appearance order
    assert corpus.vocab.idx2word[corpus.train[len(first_words)]] == "<eos>"
    assert len(load_word_corpus("wikitext-2").vocab) == 33278


def test_batchify_and_get_batch():
    data = torch.arange(23)
    source = batchify(data, 4)
    assert source.shape == (5, 4) and source[:, 1].tolist() == [5, 6, 7, 8, 9]  # streams are contiguous columns
    inputs, targets = get_batch(source, 0, 3)
    assert inputs.shape == (3, 4) and torch.equal(targets, source[1:4].reshape(-1))
    inputs, targets = get_batch(source, 3, 3)  # the last window is shorter
    assert inputs.shape == (1, 4)
    with pytest.raises(DataError, match="fewer than one BPTT batch"):
        batchify(data, 4, bptt=35)


def test_training_data_shorter_than_one_bptt_batch_is_an_error(tiny_corpus_dir):
    corpus = load_word_corpus(tiny_corpus_dir)
    model = WordLSTM(len(corpus.vocab), 8, 8, 1)
    with pytest.raises(DataError, match="training data: 300 tokens .* fewer than one BPTT batch"):
        train_lm(model, corpus, TrainConfig(epochs=1, batch_size=20, bptt=35), train_data=corpus.train[:300])


def test_factorized_lstm_matches_nn_lstm_on_every_path():
    torch.manual_seed(0)
    reference = nn.LSTM(12, 10, 2)
    lstm = FactorizedLSTM.from_lstm(reference)
    x = torch.randn(9, 3, 12)
    expected, (h, c) = reference(x)
    for fused in (True, False):
        output, (h2, c2) = lstm(x, fused=fused)
        assert torch.allclose(output, expected, atol=1e-6) and torch.allclose(c2, c, atol=1e-6)
    # Low-rank W_i alone keeps the fused kernel (input projected to rank k first): same result at full rank.
    lowrank_input = copy.deepcopy(lstm)
    lowrank_input.ih_l1 = LowRankLinear.from_linear(lowrank_input.ih_l1, 10)
    assert lowrank_input.fusable() and not lowrank_input.all_dense()
    assert torch.allclose(lowrank_input(x)[0], expected, atol=1e-5)
    assert torch.allclose(lowrank_input(x, fused=False)[0], expected, atol=1e-5)
    # Full-rank factors and a prune that keeps everything are the same map: the custom loops must agree.
    lstm.hh_l0 = LowRankLinear.from_linear(lstm.hh_l0, 10)
    lstm.ih_l1 = PrunedLinear.from_weight(lstm.ih_l1.weight.detach(), torch.ones(40, 10, dtype=torch.bool))
    output, _ = lstm(x)
    assert not lstm.all_dense() and torch.allclose(output, expected, atol=1e-5)
    output.sum().backward()
    assert lstm.hh_l0.left.grad is not None and lstm.ih_l1.values.grad is not None
    # A real low rank changes the output, and the state dict round-trips under nn.LSTM's keys.
    assert set(reference.state_dict()) == set(lstm.nn_lstm_state_dict())


def test_tiny_model_learns_and_is_reproducible(tiny_trained, tiny_corpus_dir):
    loaded, corpus, history = tiny_trained
    vocab = len(corpus.vocab)
    test = evaluate_lm(loaded.model, corpus.test)
    assert test["perplexity"] < vocab / 4  # far below a uniform guess
    assert history["epochs"][-1]["valid_perplexity"] < history["epochs"][0]["valid_perplexity"] * 1.05
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        again = WordLSTM(vocab, 16, 16, 2, dropout=0.2)
        train_lm(again, corpus, TrainConfig(epochs=0.5, batch_size=10, bptt=20, lr=20.0, seed=0))
        runs.append(again.state_dict())
    assert all(torch.equal(runs[0][key], runs[1][key]) for key in runs[0])  # same seed, same weights


def test_example_state_dict_loads_and_vocab_mismatch_fails(tiny_corpus_dir, tmp_path):
    corpus = load_word_corpus(tiny_corpus_dir)
    torch.manual_seed(1)
    example = RNNModel(len(corpus.vocab), 16, 16, 2).eval()
    path = tmp_path / "model.pt"
    torch.save(example.state_dict(), path)
    loaded = load_example_checkpoint(path, tiny_corpus_dir)
    ids = corpus.test[:40].view(20, 2)
    with torch.no_grad():
        assert torch.allclose(loaded.model(ids)[0], example(ids)[0], atol=1e-5)
    assert set(example_state_dict(loaded.model)) == set(example.state_dict())
    small = RNNModel(len(corpus.vocab) - 1, 16, 16, 2)
    torch.save(small.state_dict(), path)
    with pytest.raises(DataError, match=rf"embedding of {len(corpus.vocab) - 1} words .* vocabulary of {len(corpus.vocab)}"):
        load_example_checkpoint(path, tiny_corpus_dir)


def test_whole_pickled_checkpoint_needs_opt_in(tiny_corpus_dir, tmp_path):
    corpus = load_word_corpus(tiny_corpus_dir)
    torch.manual_seed(2)
    example = RNNModel(len(corpus.vocab), 16, 16, 1).eval()
    path = tmp_path / "whole.pt"
    torch.save(example, path)  # what the example's main.py --save writes
    with pytest.raises(InvalidArgument, match="whole pickled model.*unpickle.*allow-pickle"):
        load_example_checkpoint(path, tiny_corpus_dir)
    loaded = load_example_checkpoint(path, tiny_corpus_dir, allow_pickle=True)
    ids = corpus.test[:30].view(15, 2)
    with torch.no_grad():
        assert torch.allclose(loaded.model(ids)[0], example(ids)[0], atol=1e-5)


@pytest.mark.parametrize("method", ["svd", "seminmf", "prune"])
def test_compress_targets_save_load(tiny_trained, tmp_path, method):
    loaded, corpus, _ = tiny_trained
    dense = evaluate_lm(loaded.model, corpus.test)["perplexity"]
    model = _copy(loaded)
    options = {"seminmf_iterations": 60} if method == "seminmf" else {}
    report = lmshrink.compress(model, lmshrink.Plan(method=method, targets=("W_h",), rank=8, options=options), progress=False)
    assert [row["name"] for row in report.compressed] == ["rnn.hh_l0", "rnn.hh_l1"]
    assert type(model.model.rnn.ih_l0) is nn.Linear  # W_i untouched
    part = model.model.rnn.hh_l0
    assert sum(p.numel() for p in part.parameters()) == 8 * (32 + 128)  # same parameter count for every method
    compressed = evaluate_lm(model.model, corpus.test)["perplexity"]
    assert report.compressed[0]["relative_error"] > 0.05
    assert 0.9 * dense < compressed < 3 * dense  # a small loss at most (pruning a tiny W_h may even help)
    path = lmshrink.save(model, tmp_path / method)
    again = lmshrink.load(path)
    assert type(again.model.rnn.hh_l0) is type(part)
    assert evaluate_lm(again.model, corpus.test)["perplexity"] == pytest.approx(compressed, rel=1e-6)


def test_targets_w_i_and_bad_rank(tiny_trained):
    loaded, _, _ = tiny_trained
    model = _copy(loaded)
    report = lmshrink.compress(model, lmshrink.Plan(method="svd", targets=("W_i",), ratio=0.3), progress=False)
    assert [row["name"] for row in report.compressed] == ["rnn.ih_l0", "rnn.ih_l1"]
    with pytest.raises(InvalidArgument, match="rank"):
        lmshrink.compress(_copy(loaded), lmshrink.Plan(method="seminmf", targets=("W_h",), rank=33), progress=False)


def test_tied_decoder_untie_head_roundtrip(tiny_corpus_dir, tmp_path):
    corpus = load_word_corpus(tiny_corpus_dir)
    torch.manual_seed(0)
    model = WordLSTM(len(corpus.vocab), 16, 16, 1, dropout=0.0, tie_weights=True).eval()
    table = model.encoder.weight.detach().clone()
    loaded = LoadedModel(model, FAMILIES["word-lstm"], corpus.vocab, "tied")
    lmshrink.compress(loaded, lmshrink.Plan(method="svd", targets=("embedding",), rank=4, untie_head=True), progress=False)
    assert type(model.decoder) is nn.Linear and torch.equal(model.decoder.weight, table) and not model.config.tie_weights
    ids = torch.arange(12).reshape(6, 2)
    path = lmshrink.save(loaded, tmp_path / "untied")
    again = lmshrink.load(path)
    assert type(again.model.encoder).__name__ == "LowRankEmbedding" and torch.equal(again.model.decoder.weight, table)
    with torch.no_grad():
        assert torch.equal(again.model(ids)[0], model(ids)[0])


def test_finetuning_recovers_perplexity(tiny_trained):
    loaded, corpus, _ = tiny_trained
    dense = evaluate_lm(loaded.model, corpus.test)["perplexity"]
    model = _copy(loaded)
    lmshrink.compress(model, lmshrink.Plan(method="svd", targets=("lstm",), rank=2), progress=False)
    result = finetune_lm(model.model, corpus, steps=40, lr=5.0, batch_size=10, bptt=20, dense_reference=dense)
    assert result["after"] < result["before"] and 0 < result["recovery"]
    assert result["steps"] == 40
    with pytest.raises(InvalidArgument, match="steps/epochs"):
        finetune_lm(model.model, corpus)


def test_inspect_norm_columns(tiny_trained):
    from lmshrink.analysis import inspect_targets
    from lmshrink.plan import select_targets

    loaded, _, _ = tiny_trained
    rows = inspect_targets(select_targets(loaded.candidates(), ("lstm",)), progress=False)
    assert [r["name"] for r in rows] == ["rnn.ih_l0", "rnn.hh_l0", "rnn.ih_l1", "rnn.hh_l1"]
    weight = loaded.model.rnn.hh_l0.weight.detach().double()
    assert rows[1]["l1"] == pytest.approx(float(weight.abs().sum()), rel=1e-6)
    assert rows[1]["nuclear"] == pytest.approx(float(torch.linalg.svdvals(weight).sum()), rel=1e-5)


def test_vocabulary_encode_unknown_words():
    vocab = Vocabulary(["a", "b", "<eos>"])
    assert vocab.encode("a b\nb") == [0, 1, 2, 1]  # no <eos> after an unterminated last line
    with pytest.raises(DataError, match="'zzz' is not in the vocabulary"):
        vocab.encode("a zzz\n")
    assert Vocabulary(["<unk>", "a"]).encode("a zzz\n") == [1, 0, 0]  # unknown words (and <eos>) map to <unk>


def test_cli_train_lm_list_and_import(tiny_corpus_dir, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from lmshrink.lstm_cli import import_lm_command, train_lm_command

    monkeypatch.setenv("LMSHRINK_CACHE", str(tmp_path / "cache"))
    listed = CliRunner().invoke(train_lm_command, ["--list"])
    assert listed.exit_code == 0 and "ptb-small" in listed.output and "missing" in listed.output
    corpus = load_word_corpus(tiny_corpus_dir)
    example = RNNModel(len(corpus.vocab), 16, 16, 2).eval()
    torch.save(example, tmp_path / "whole.pt")
    refused = CliRunner().invoke(import_lm_command, [str(tmp_path / "whole.pt"), "--corpus", str(tiny_corpus_dir), "--out", str(tmp_path / "out")])
    assert isinstance(refused.exception, InvalidArgument) and "unpickle" in str(refused.exception)
    assert not (tmp_path / "out").exists()
    imported = CliRunner().invoke(import_lm_command, [str(tmp_path / "whole.pt"), "--corpus", str(tiny_corpus_dir),
                                                      "--out", str(tmp_path / "out"), "--allow-pickle"])
    assert imported.exit_code == 0, imported.output
    again = lmshrink.load(tmp_path / "out")
    ids = corpus.test[:20].view(10, 2)
    with torch.no_grad():
        assert torch.allclose(again.model(ids)[0], example(ids)[0], atol=1e-5)
