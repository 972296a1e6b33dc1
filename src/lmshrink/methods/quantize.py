"""Uniform k-bit quantization of whole matrices: the "quantization alone" baseline (packed integers + scales)."""

from __future__ import annotations

from dataclasses import dataclass

from lmshrink.bounds import Bounds
from lmshrink.decompose.quantize import SUPPORTED_BITS, check_bits
from lmshrink.layers.quantized import QuantizedEmbedding, QuantizedLinear
from lmshrink.methods import MethodOptions, option, register_method

BITS = Bounds(0, 8)  # which of them are supported: decompose.quantize.check_bits
QUANT_GROUP = Bounds(0, 1 << 20)


@dataclass(frozen=True)
class QuantizeOptions(MethodOptions):
    bits: int = option(8, f"bits per stored value, one of {SUPPORTED_BITS}", bounds=BITS)
    quant_group: int = option(0, "columns sharing one scale (0: one scale per row)", bounds=QUANT_GROUP)


@register_method(
    "quantize",
    kind="module",
    summary="uniform k-bit quantization per row or column group (packed integers, float16 scales)",
    options=QuantizeOptions,
    target_kinds=("linear", "embedding", "lm_head"),
)
def quantize_method(target, plan, stats, options: QuantizeOptions):
    # BITS also allows 0 (groupreduce's "float factors"); here every value must be real bits.
    bits = check_bits(options.bits, "--bits")
    group_size = options.quant_group or None
    if target.kind == "embedding":
        return QuantizedEmbedding.from_embedding(target.module, bits, group_size)
    return QuantizedLinear.from_linear(target.module, bits, group_size)
