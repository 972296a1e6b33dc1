import pytest
import torch
from torch import nn

import lmshrink

from lmshrink.layers import LowRankEmbedding, LowRankLinear, TiedHead


def test_lowrank_linear_at_full_rank_equals_dense():
    torch.manual_seed(0)
    dense = nn.Linear(24, 40)
    layer = LowRankLinear.from_linear(dense, 24)
    x = torch.randn(3, 5, 24)
    assert torch.allclose(layer(x), dense(x), atol=1e-5)
    assert torch.allclose(layer.dense_weight(), dense.weight, atol=1e-5)
    assert sum(p.numel() for p in layer.parameters()) == 24 * 24 + 24 * 40 + 40


def test_lowrank_linear_from_gpt2_conv1d():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(30, 20)  # nx=20 inputs, nf=30 outputs, weight stored (in, out)
    nn.init.normal_(conv.bias)
    layer = LowRankLinear.from_linear(conv, 20)
    x = torch.randn(4, 20)
    assert torch.allclose(layer(x), conv(x), atol=1e-5)


def test_truncated_lowrank_linear_error_is_optimal():
    torch.manual_seed(0)
    dense = nn.Linear(32, 48, bias=False)
    layer = LowRankLinear.from_linear(dense, 8)
    s = torch.linalg.svdvals(dense.weight.detach())
    assert torch.linalg.norm(dense.weight - layer.dense_weight()).item() == pytest.approx(s[8:].pow(2).sum().sqrt().item(), rel=1e-4)


def test_lowrank_embedding_and_tied_head():
    torch.manual_seed(0)
    embedding = nn.Embedding(50, 16, padding_idx=1)
    layer = LowRankEmbedding.from_embedding(embedding, 16)
    ids = torch.tensor([[0, 1, 49, 7]])
    assert torch.allclose(layer(ids), embedding(ids), atol=1e-5)
    head = TiedHead(layer, "embed")
    hidden = torch.randn(2, 3, 16)
    assert torch.allclose(head(hidden), hidden @ embedding.weight.T, atol=1e-4)
    # the head shares the embedding's parameters instead of holding copies
    assert list(head.parameters()) == []
    with pytest.raises(IndexError, match=r"\[0, 50\)"):
        layer(torch.tensor([50]))


def test_layer_configs_rebuild_same_shapes():
    layer = LowRankLinear(10, 20, 3, bias=False)
    again = LowRankLinear.from_config(layer.layer_config(), None)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in layer.state_dict().items()}
    emb = LowRankEmbedding(100, 8, 4, padding_idx=0)
    again = LowRankEmbedding.from_config(emb.layer_config(), None)
    assert again.layer_config() == emb.layer_config()


@pytest.mark.parametrize("method,amount", [("svd", {"rank": 40}), ("tt", {"ratio": 0.6}), ("groupreduce", {"ratio": 0.6}),
                                           ("svd", {"rank": 40, "bits": 8}), ("quantize", {"ratio": 1.0})])
def test_a_scaled_word_embedding_keeps_its_scale_when_compressed_saved_and_loaded(tmp_path, method, amount):
    """Gemma 3 multiplies its embedding lookups by sqrt(hidden) (embed_scale) but not the tied head's logits: a
    factorized embedding must do the same, or every hidden state is off by that factor (8 here)."""
    from conftest import tiny_gemma3

    folder = tiny_gemma3(tmp_path / "gemma")
    original = lmshrink.load_model(folder)
    scale = float(original.model.model.embed_tokens.embed_scale)
    assert scale == pytest.approx(8.0)
    loaded = lmshrink.load_model(folder)
    lmshrink.compress(loaded, lmshrink.Plan(method=method, targets=("embedding",), **amount), data="pydoc", progress=False)
    lmshrink.save(loaded, tmp_path / "out")
    ids = torch.randint(0, 256, (2, 12))
    hidden = torch.randn(2, 12, 64)
    for model in (loaded.model, lmshrink.load(tmp_path / "out").model):
        layer, head = model.model.embed_tokens, model.lm_head
        assert type(layer).__name__ != "Gemma3TextScaledWordEmbedding"
        with torch.no_grad():
            table = layer.dense_weight()
            assert torch.allclose(layer(ids), table[ids] * scale, atol=1e-5)
            assert torch.allclose(head(hidden), hidden @ table.T, atol=1e-4)  # the head: no scale
            # The original architecture holding the compressed table gives the same logits (its tied head included).
            original.model.model.embed_tokens.weight.copy_(table)
            assert torch.allclose(model(input_ids=ids).logits, original.model(input_ids=ids).logits, atol=1e-4)


@pytest.mark.parametrize("value", [-3.0, 0, "8", True, 1e300])
def test_a_hostile_output_scale_in_a_manifest_is_refused(tmp_path, value):
    import json

    from conftest import tiny_gemma3
    from lmshrink.errors import CorruptFile

    loaded = lmshrink.load_model(tiny_gemma3(tmp_path / "gemma"))
    lmshrink.compress(loaded, lmshrink.Plan(method="svd", targets=("embedding",), rank=8), progress=False)
    lmshrink.save(loaded, tmp_path / "out")
    manifest = tmp_path / "out" / "lmshrink.json"
    data = json.loads(manifest.read_text())
    assert data["modules"]["model.embed_tokens"]["output_scale"] == pytest.approx(8.0)
    data["modules"]["model.embed_tokens"]["output_scale"] = value
    manifest.write_text(json.dumps(data))
    with pytest.raises(CorruptFile, match="'output_scale' is"):
        lmshrink.load(tmp_path / "out")
