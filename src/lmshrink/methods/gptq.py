"""GPTQ (Frantar et al. 2023): k-bit quantization that compensates each rounding error on calibration inputs
(lmshrink.decompose.quantize.quantize_compensated). Stored exactly like the ``quantize`` method's layers (packed
integers + float16 scale and minimum per row or column group), so bytes are the same; only the output error differs.
``--bits`` / ``--quant-group`` (Plan.bits / group_size) as for ``quantize``; 4 bits when none are given.

Linears and output layers use their input Gram. An embedding tied to the output layer uses the head's (the final
hidden states), so its logits are what is kept; an untied embedding is looked up by one-hot token ids, whose Gram is
diagonal, so GPTQ reduces to round to nearest there (stored as such: a recipe may name every table, tied or not).
"""

from __future__ import annotations

from dataclasses import dataclass

from lmshrink.bounds import Bounds
from lmshrink.decompose.quantize import SUPPORTED_BITS, check_bits, quantize_compensated
from lmshrink.layers.lowrank import linear_weight
from lmshrink.layers.quantized import QuantizedEmbedding, QuantizedLinear
from lmshrink.methods import MethodOptions, option, register_method, required_stat
from lmshrink.methods.quantize import BITS, QUANT_GROUP


@dataclass(frozen=True)
class GPTQOptions(MethodOptions):
    bits: int = option(4, f"bits per stored value, one of {SUPPORTED_BITS}", bounds=BITS)
    quant_group: int = option(0, "columns sharing one scale (0: one scale per row)", bounds=QUANT_GROUP)
    gptq_damping: float = option(0.01, "added to the input Gram's diagonal, as a share of its mean (keeps its inverse stable)",
                                 bounds=Bounds(0, 1000, low_open=True))


@register_method(
    "gptq",
    kind="module",
    summary="GPTQ: k-bit quantization, rounding errors compensated on calibration inputs (input Gram; tied embeddings: the head's)",
    needs=("input_gram",),
    options=GPTQOptions,
    target_kinds=("linear", "lm_head", "embedding"),
)
def gptq(target, plan, stats, options: GPTQOptions):
    bits = check_bits(options.bits, "--bits")
    embedding = target.kind == "embedding"
    if embedding and not target.tied_head:
        # Its inputs are one-hot token ids, whose Gram is diagonal: nothing to compensate across columns, so GPTQ's
        # answer is round to nearest, and that is what is stored.
        return QuantizedEmbedding.from_embedding(target.module, bits, options.quant_group or None)
    weight = (target.module.weight if embedding else linear_weight(target.module)).detach()
    gram = required_stat(stats, "input_gram", "gptq", (weight.shape[1], weight.shape[1])).to(weight.device)
    quantized = quantize_compensated(weight, bits, options.quant_group or None, gram, options.gptq_damping)
    if embedding:
        return QuantizedEmbedding.from_embedding(target.module, bits, quantized=quantized)
    return QuantizedLinear.from_linear(target.module, bits, quantized=quantized)
