"""The core on real models and real text: SmolLM2-135M (GGUF) and all-MiniLM-L6-v2, WikiText-2."""

import torch

import lmshrink
from lmshrink.data import encode_prefix
from lmshrink.evaluate import corpus_perplexity, fidelity, pooled_embeddings, sentences

# Measured with lmshrink 0.1.0 (and independently with a bare transformers loop): SmolLM2-135M-Instruct,
# GGUF Q4_1 dequantized to float32, first 2048 tokens of WikiText-2 test as-is, windows of 512.
SMOLLM2_PPL_2048 = 25.494


def test_smollm2_loads_from_gguf_with_tied_embedding(smollm2_pristine):
    model = smollm2_pristine.model
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert tuple(model.model.embed_tokens.weight.shape) == (49152, 576)
    assert lmshrink.accounting.count_params(model) == 134_515_008  # tied head counted once


def test_smollm2_perplexity_in_recorded_range(smollm2_pristine, wikitext):
    result = corpus_perplexity(smollm2_pristine, wikitext, tokens=2048, progress=False)
    assert result["tokens"] == 4 * 511
    assert abs(result["perplexity"] - SMOLLM2_PPL_2048) / SMOLLM2_PPL_2048 < 0.005


def test_prefix_tokenization_matches_whole_text(smollm2_pristine, wikitext):
    whole = smollm2_pristine.encode(wikitext.test[:200_000])
    assert encode_prefix(smollm2_pristine, wikitext.test, 4096) == whole[:4096]


def test_smollm2_svd_roundtrip_same_logits(smollm2, wikitext, tmp_path):
    plan = lmshrink.Plan(method="svd", ratio=0.9, targets=("model.layers.0.*", "model.layers.1.*", "embedding"))
    report = lmshrink.compress(smollm2, plan, progress=False)
    assert len(report.compressed) == 15 and report.params_after < report.params_before
    embedding_row = next(r for r in report.modules if r["kind"] == "embedding")
    assert embedding_row["tied_head"] == "lm_head" and embedding_row["rank"] == 512
    ids = torch.tensor([smollm2.encode(wikitext.test[:2000])[:128]])
    with torch.no_grad():
        expected = smollm2.logits(ids)
    lmshrink.save(smollm2, tmp_path / "smol")
    again = lmshrink.load(tmp_path / "smol")
    with torch.no_grad():
        got = again.logits(ids)
    assert (torch.linalg.norm(got - expected) / torch.linalg.norm(expected)).item() <= 1e-5
    assert lmshrink.accounting.count_params(again.model) == report.params_after
    assert again.encode("Hello world") == smollm2.encode("Hello world")  # tokenizer saved with the model


def test_minilm_svd_fidelity(minilm, wikitext):
    texts = sentences(wikitext.test, 32)
    reference = pooled_embeddings(minilm, texts)
    report = lmshrink.compress(minilm, lmshrink.Plan(method="svd", ratio=0.9), progress=False)
    assert len(report.compressed) == 36  # 6 layers x (q, k, v, attention out, intermediate, output)
    mild = fidelity(reference, pooled_embeddings(minilm, texts))
    assert 0.5 < mild["cosine_mean"] < 0.9999
