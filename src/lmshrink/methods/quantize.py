"""Uniform k-bit quantization of whole matrices: the "quantization alone" baseline (packed integers + scales)."""

from __future__ import annotations

from lmshrink.bounds import Bounds
from lmshrink.decompose.quantize import SUPPORTED_BITS, check_bits
from lmshrink.layers.quantized import QuantizedEmbedding, QuantizedLinear
from lmshrink.methods import MethodOption, register_method

BITS = Bounds(0, 8)  # which of them are supported: decompose.quantize.check_bits
QUANT_GROUP = Bounds(0, 1 << 20)


@register_method(
    "quantize",
    kind="module",
    summary="uniform k-bit quantization per row or column group (packed integers, float16 scales)",
    options=(
        MethodOption("bits", int, 8, f"bits per stored value, one of {SUPPORTED_BITS}, for any method (Plan.bits): its factors as packed integers; quantize: the dense matrices (default 8); 0: float",
                     bounds=BITS),
        MethodOption("quant_group", int, 0, "with --bits: columns sharing one scale (Plan.group_size; 0: one scale per row)",
                     bounds=QUANT_GROUP),
    ),
    target_kinds=("linear", "embedding", "lm_head"),
)
def quantize_method(target, plan, stats, options):
    # The --bits option is shared with groupreduce, where 0 means "float factors"; here every value must be real bits.
    bits = check_bits(options["bits"], "--bits")
    group_size = options.get("quant_group") or None
    if target.kind == "embedding":
        return QuantizedEmbedding.from_embedding(target.module, bits, group_size)
    return QuantizedLinear.from_linear(target.module, bits, group_size)
