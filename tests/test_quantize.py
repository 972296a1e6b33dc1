"""k-bit quantization: packing, error bounds, byte counts, the quantized layers and the "quantize" method."""

from __future__ import annotations

import pytest
import torch

import lmshrink
from conftest import tiny_llama
from lmshrink.accounting import count_bytes
from lmshrink.decompose.quantize import (
    SUPPORTED_BITS,
    dequantize,
    pack_bits,
    quantize,
    quantized_nbytes,
    unpack_bits,
)
from lmshrink.errors import InvalidArgument
from lmshrink.layers.quantized import PackedTensor, QuantizedEmbedding, QuantizedLinear


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_pack_roundtrip_and_size(bits):
    values = torch.randint(0, 1 << bits, (10_001,), generator=torch.Generator().manual_seed(bits))
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-10_001 * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, values.numel()), values)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("group_size", [None, 16])
def test_quantization_error_is_within_half_a_step(bits, group_size):
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(40, 50, generator=generator) * torch.logspace(-2, 1, 40)[:, None]
    quantized = quantize(matrix, bits, group_size)
    restored = dequantize(quantized)
    columns = torch.arange(50) // (50 if group_size is None else group_size)
    step = quantized.scales.float()[:, columns]
    # Half a step of rounding plus the float16 rounding of the stored minimum.
    slack = quantized.minimums.float().abs()[:, columns] * 2 ** -10
    assert ((restored - matrix).abs() <= step / 2 + slack + 1e-6).all()
    assert quantized.nbytes() == quantized_nbytes((40, 50), bits, group_size)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_quantize_on_cuda_equals_cpu(bits):
    """Quantizing and packing on the GPU give the CPU's integers; dequantizing (as a quantized layer does in every
    forward pass there) its values to rounding."""
    matrix = torch.randn(40, 50, generator=torch.Generator().manual_seed(bits))
    for group_size in (None, 16):
        here, there = quantize(matrix, bits, group_size), quantize(matrix.cuda(), bits, group_size)
        assert there.packed.is_cuda and torch.equal(there.packed.cpu(), here.packed)
        assert torch.allclose(dequantize(there).cpu(), dequantize(here), rtol=1e-6, atol=1e-7)  # the GPU fuses multiply-add
    layer, x = QuantizedLinear.from_linear(torch.nn.Linear(50, 40), bits), torch.randn(3, 50)
    expected = layer(x)
    assert torch.allclose(layer.cuda()(x.cuda()).cpu(), expected, atol=1e-5)


def test_more_bits_less_error():
    matrix = torch.randn(64, 64, generator=torch.Generator().manual_seed(3))
    errors = [float((dequantize(quantize(matrix, b)) - matrix).norm()) for b in SUPPORTED_BITS]
    assert errors == sorted(errors, reverse=True)


def test_bits_outside_the_supported_set():
    with pytest.raises(InvalidArgument, match="bits"):
        quantize(torch.randn(3, 3), 7)
    with pytest.raises(InvalidArgument, match="bits"):
        quantize(torch.randn(3, 3), 16)
    with pytest.raises(InvalidArgument, match="group_size"):
        quantize(torch.randn(3, 3), 4, -2)


def test_packed_tensor_is_buffers_only_and_reloads():
    matrix = torch.randn(30, 20)
    packed = PackedTensor.from_tensor(matrix, 6, 8)
    assert not list(packed.parameters())
    state = packed.state_dict()
    assert set(state) == {"packed", "scales", "minimums"} and state["packed"].dtype == torch.uint8
    assert sum(t.numel() * t.element_size() for t in state.values()) == quantized_nbytes((30, 20), 6, 8)
    again = PackedTensor.from_dict(packed.config())
    again.load_state_dict(state)
    assert torch.equal(again.value(), packed.value())


def test_quantized_embedding_and_linear():
    torch.manual_seed(0)  # the tolerances hold for typical draws; a fixed one keeps the test from depending on order
    embedding = torch.nn.Embedding(100, 16)
    layer = QuantizedEmbedding.from_embedding(embedding, 8)
    ids = torch.tensor([[0, 5, 99]])
    assert torch.allclose(layer(ids), embedding(ids), atol=0.02)
    assert count_bytes(layer) == quantized_nbytes((100, 16), 8)
    with pytest.raises(IndexError):
        layer(torch.tensor([100]))
    linear = torch.nn.Linear(16, 12)
    qlinear = QuantizedLinear.from_linear(linear, 4, 8)
    x = torch.randn(5, 16)
    assert torch.allclose(qlinear(x), linear(x), atol=0.1)


@pytest.mark.parametrize("tie", [False, True])
def test_quantize_method_saves_packed_integers(tie, tmp_path):
    loaded = tiny_llama(tie=tie)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = loaded.logits(ids)
    plan = lmshrink.Plan(method="quantize", targets=("embedding", "lm_head"), ratio=1.0, options={"bits": 4})
    report = lmshrink.compress(loaded, plan, progress=False)
    with torch.no_grad():
        logits = loaded.logits(ids)
    assert 0 < float((logits - reference).abs().max()) < 0.5
    tables = 1 if tie else 2
    assert report.bytes_before - report.bytes_after == tables * (256 * 64 * 4 - quantized_nbytes((256, 64), 4))
    lmshrink.save(loaded, tmp_path / "q")
    again = lmshrink.load(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(again.logits(ids), logits)
    stored = {k: v for k, v in again.model.state_dict().items() if "embed_tokens" in k}
    assert stored["model.embed_tokens.weight_q.packed"].dtype == torch.uint8


@pytest.mark.parametrize("plan", [lmshrink.Plan(method="quantize", ratio=1.0, options={"bits": 8}),
                                  lmshrink.Plan(method="svd", ratio=0.5, bits=4)])
def test_params_count_the_packed_integers_as_the_rows_say(plan, tmp_path):
    """A quantized matrix's entries are parameters stored in k bits: the model's count, the report's per-matrix rows and
    a reload all agree (they used to count only float parameters, so a 4-bit factor counted as nothing)."""
    from lmshrink.accounting import count_params

    loaded = tiny_llama(seed=3)
    before = count_params(loaded.model)
    report = lmshrink.compress(loaded, plan, progress=False)
    saved = sum(row["params_before"] - row["params_after"] for row in report.modules)
    assert report.params_after == count_params(loaded.model) == before - saved
    assert all(row["params_after"] > 0 for row in report.modules)
    if plan.method == "quantize":
        assert saved == 0 and all(row["params_after"] == row["shape"][0] * row["shape"][1] for row in report.modules)
    lmshrink.save(loaded, tmp_path / "q")
    assert count_params(lmshrink.load(tmp_path / "q").model) == report.params_after
