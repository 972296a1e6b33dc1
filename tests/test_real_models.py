"""The core on real models and real text: SmolLM2-135M (GGUF) and all-MiniLM-L6-v2, on English prose that every
Python carries (the 'pydoc' corpus); the figure recorded on WikiText-2 is checked where the shared data is present."""

import sys

import pytest
import torch

import lmshrink
from conftest import require_shared
from lmshrink.data import encode_prefix
from lmshrink.evaluate import corpus_perplexity, fidelity, pooled_embeddings, sentences

# Measured with lmshrink 0.1.0 (and independently with a bare transformers loop): SmolLM2-135M-Instruct,
# GGUF Q4_1 dequantized to float32, first 2048 tokens of WikiText-2 test as-is, windows of 512.
SMOLLM2_PPL_2048 = 25.494
# The same on the 'pydoc' corpus's evaluation text (Python 3.11's reference manual topics); the text follows the
# Python version, so other versions are held to a wider range around it.
SMOLLM2_PYDOC_PPL_2048 = {(3, 11): 9.5583}


def test_smollm2_loads_from_gguf_with_tied_embedding(smollm2_pristine):
    model = smollm2_pristine.model
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert tuple(model.model.embed_tokens.weight.shape) == (49152, 576)
    assert lmshrink.accounting.count_params(model) == 134_515_008  # tied head counted once


def test_smollm2_perplexity_in_recorded_range(smollm2_pristine):
    wikitext = lmshrink.load_corpus(require_shared("checks the WikiText-2 perplexity recorded in README and benchmarks") / "wikitext-2")
    result = corpus_perplexity(smollm2_pristine, wikitext, tokens=2048, progress=False)
    assert result["tokens"] == 4 * 511
    assert abs(result["perplexity"] - SMOLLM2_PPL_2048) / SMOLLM2_PPL_2048 < 0.005


def test_smollm2_perplexity_on_prose_in_recorded_range(smollm2_pristine, prose):
    result = corpus_perplexity(smollm2_pristine, prose, tokens=2048, progress=False)
    assert result["tokens"] == 4 * 511 and result["corpus"] == "pydoc"
    recorded = SMOLLM2_PYDOC_PPL_2048.get(sys.version_info[:2])
    if recorded is not None:
        assert result["perplexity"] == pytest.approx(recorded, rel=0.005)
    else:
        assert 6 < result["perplexity"] < 15


def test_prefix_tokenization_matches_whole_text(smollm2_pristine, prose):
    whole = smollm2_pristine.encode(prose.test[:200_000])
    assert encode_prefix(smollm2_pristine, prose.test, 4096) == whole[:4096]


def test_smollm2_svd_roundtrip_same_logits(smollm2, prose, tmp_path):
    plan = lmshrink.Plan(method="svd", ratio=0.9, targets=("model.layers.0.*", "model.layers.1.*", "embedding"))
    report = lmshrink.compress(smollm2, plan, progress=False)
    assert len(report.compressed) == 15 and report.params_after < report.params_before
    embedding_row = next(r for r in report.modules if r["kind"] == "embedding")
    assert embedding_row["tied_head"] == "lm_head" and embedding_row["rank"] == 512
    ids = torch.tensor([smollm2.encode(prose.test[:2000])[:128]])
    with torch.no_grad():
        expected = smollm2.logits(ids)
    lmshrink.save(smollm2, tmp_path / "smol")
    again = lmshrink.load(tmp_path / "smol")
    with torch.no_grad():
        got = again.logits(ids)
    assert (torch.linalg.norm(got - expected) / torch.linalg.norm(expected)).item() <= 1e-5
    assert lmshrink.accounting.count_params(again.model) == report.params_after
    assert again.encode("Hello world") == smollm2.encode("Hello world")  # tokenizer saved with the model


def test_minilm_svd_fidelity(minilm, prose):
    texts = sentences(prose.test, 32)
    reference = pooled_embeddings(minilm, texts)
    report = lmshrink.compress(minilm, lmshrink.Plan(method="svd", ratio=0.9), progress=False)
    assert len(report.compressed) == 36  # 6 layers x (q, k, v, attention out, intermediate, output)
    mild = fidelity(reference, pooled_embeddings(minilm, texts))
    assert 0.5 < mild["cosine_mean"] < 0.9999
