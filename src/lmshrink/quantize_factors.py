"""Plan.bits: store the factors a stage produced as k-bit packed integers (per-row or per-column-group scales).

One meaning of ``bits`` for every method: after ``compress`` factorizes, each new layer is swapped for its quantized
twin (lmshrink.layers.quantized_factors; GroupReduce tables take their own ``bits``). The ``quantize`` method, which
quantizes dense matrices (the "quantization alone" baseline), and GroupReduce's older ``bits``/``quant_group``
options read the same Plan fields (``reconcile_bits``).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from lmshrink.accounting import count_bytes, relative_error
from lmshrink.decompose.quantize import SUPPORTED_BITS, quantize_compensated
from lmshrink.errors import InvalidArgument
from lmshrink.layers.base import carry_output_scale, replace_module
from lmshrink.layers.block import _BlockLowRankTable
from lmshrink.layers.channels import ChannelLinear
from lmshrink.layers.lowrank import LowRankEmbedding, LowRankLinear, TiedHead, linear_weight
from lmshrink.layers.quantized import MixedBitsEmbedding, PackedTensor, QuantizedEmbedding, QuantizedLinear
from lmshrink.layers.quantized_factors import (QuantizedChannelLinear, QuantizedLowRankEmbedding, QuantizedLowRankLinear,
                                               QuantizedTTEmbedding, QuantizedTTMatrixEmbedding)
from lmshrink.layers.tt import TTEmbedding, TTMatrixEmbedding
from lmshrink.plan import Plan, Target

# Methods whose output layers can hold quantized factors ("lowrank" methods always can, on linears and embeddings).
QUANTIZABLE_MODULE_METHODS = ("groupreduce", "tt", "tt-matrix", "quantize", "gptq", "nystrom")
# Methods that quantize dense matrices themselves (their bits/quant_group options are the Plan's bits/group_size).
DENSE_QUANTIZERS = ("quantize", "gptq")
QUANTIZABLE_LAYERS = ("LowRankLinear", "LowRankEmbedding (and a TiedHead over it)", "TTEmbedding", "TTMatrixEmbedding",
                      "BlockLowRankEmbedding", "BlockLowRankOutput", "ChannelLinear")
# Options that older code paths used for the same thing: GroupReduce's and quantize's own.
_OPTION_FIELDS = {"bits": "bits", "quant_group": "group_size"}


def reconcile_bits(plan: Plan) -> Plan:
    """The plan with ``bits``/``quant_group`` method options moved into Plan.bits / Plan.group_size (one meaning).

    Both given and different is an error. The dense quantizers (``quantize``, ``gptq``) get them back as their options
    (they quantize dense matrices themselves; their own default bits when none are given); every other method leaves quantization to ``quantize_factors``.
    """
    options = dict(plan.options)
    fields = {"bits": plan.bits, "group_size": plan.group_size}
    for option, field in _OPTION_FIELDS.items():
        value = options.pop(option, None)
        if value in (None, 0):
            continue
        if fields[field] is not None and fields[field] != value:
            raise InvalidArgument(f"{field} / option {option}", f"the stage gives {field}={fields[field]} and {option}={value}",
                                  f"one of them (Plan.{field} is the one meaning: what the stage's factors are stored in)")
        fields[field] = value
    plan = replace(plan, options=options, **fields)
    if plan.method in DENSE_QUANTIZERS:
        from lmshrink.methods import get_method

        plan = replace(plan, bits=plan.bits or get_method(plan.method).resolve_options({}).bits)
        plan = replace(plan, options={**options, "bits": plan.bits, "quant_group": plan.group_size or 0})
    return plan


def check_quantizable(method, targets: list[Target], plan: Plan) -> None:
    """Fail before any work when ``plan.bits`` asks for quantized factors that this method's layers cannot hold."""
    if plan.bits is None:
        return
    if method.kind == "module" and method.name not in QUANTIZABLE_MODULE_METHODS:
        raise InvalidArgument("--bits", f"method {method.name!r} builds layers that cannot store quantized factors",
                              f"no --bits with {method.name}, or a method among low-rank ones and {', '.join(QUANTIZABLE_MODULE_METHODS)} "
                              f"(layers: {', '.join(QUANTIZABLE_LAYERS)})")
    odd = [t.name for t in targets if t.kind not in ("linear", "embedding", "lm_head")]
    if odd:
        raise InvalidArgument("--bits", f"targets {odd[:3]} are of kind {sorted({t.kind for t in targets} - {'linear', 'embedding', 'lm_head'})}, "
                              "whose factorized layers cannot store quantized factors",
                              "--bits on linears, embeddings and output layers only")


def quantized_layer(layer: nn.Module, bits: int, group_size: int | None, input_gram=None) -> nn.Module:
    """The k-bit twin of a factorized layer (a new module; GroupReduce tables are rebuilt with ``bits``). Linear
    layers given ``input_gram`` (of their input) round with GPTQ's error compensation."""
    if isinstance(layer, (QuantizedLinear, QuantizedEmbedding, MixedBitsEmbedding)):
        return layer  # the quantize and gptq methods' own layers: already at their bits
    if isinstance(layer, LowRankLinear):
        return QuantizedLowRankLinear.from_lowrank(layer, bits, group_size, input_gram)
    if isinstance(layer, LowRankEmbedding):
        return QuantizedLowRankEmbedding.from_lowrank(layer, bits, group_size)
    if isinstance(layer, TTEmbedding):
        return QuantizedTTEmbedding.from_tt(layer, bits, group_size)
    if isinstance(layer, TTMatrixEmbedding):
        return QuantizedTTMatrixEmbedding.from_tt(layer, bits, group_size)
    if isinstance(layer, _BlockLowRankTable):
        return _quantized_table(layer, bits, group_size)
    if isinstance(layer, ChannelLinear):
        return QuantizedChannelLinear.from_channels(layer, bits, group_size, input_gram)
    raise InvalidArgument("--bits", f"layer {type(layer).__name__} cannot store quantized factors",
                          f"layers {', '.join(QUANTIZABLE_LAYERS)}; bits one of {SUPPORTED_BITS}")


def _quantize_dense(model: nn.Module, row: dict, bits: int, group_size: int | None, input_gram=None) -> None:
    """A target the stage left dense (factors not smaller) is stored at the stage's bits too, as a quantized matrix:
    a stage with ``bits`` holds none of its targets in float (a tied head follows its embedding)."""

    module = model.get_submodule(row["name"])
    if row["kind"] == "embedding":
        new = QuantizedEmbedding.from_embedding(module, bits, group_size)
    elif row["kind"] in ("linear", "lm_head"):
        compensated = None if input_gram is None else quantize_compensated(linear_weight(module).detach(), bits, group_size,
                                                                           input_gram.to(module.weight.device))
        new = QuantizedLinear.from_linear(module, bits, group_size, quantized=compensated)
    else:
        return
    weight = module.weight if row["kind"] == "embedding" else linear_weight(module)
    with torch.no_grad():
        row["quantization_error"] = relative_error(weight, new.dense_weight())
    carry_output_scale(module, new)
    replace_module(model, row["name"], new)
    if row.get("tied_head"):
        head = model.get_submodule(row["tied_head"])
        replace_module(model, row["tied_head"], TiedHead(new, row["name"], getattr(head, "bias", None)))
    row.update(status="dense, quantized", bits=bits, group_size=group_size, bytes_after=count_bytes(new), layer=type(new).__name__)


def _quantized_table(layer: _BlockLowRankTable, bits: int, group_size: int | None) -> _BlockLowRankTable:
    if layer.bits is not None:
        return layer
    extra = {"padding_idx": layer.padding_idx} if hasattr(layer, "padding_idx") else {"bias": layer.bias is not None}
    new = type(layer)(layer.vocab_size, layer.dim, layer.sizes, layer.ranks, bits, group_size, layer.frequencies,
                      dtype=layer.lefts[0].dtype, **extra)
    with torch.no_grad():
        new.token_group.copy_(layer.token_group)
        for g in range(len(layer.sizes)):
            new.lefts_q[g] = PackedTensor.from_tensor(layer.lefts[g].detach(), bits, group_size)
            new.rights_q[g] = PackedTensor.from_tensor(layer.rights[g].detach(), bits, group_size)
        if getattr(layer, "bias", None) is not None:
            new.bias.copy_(layer.bias.detach())
    return new


def quantize_factors(model: nn.Module, rows: list[dict], bits: int, group_size: int | None, stats: dict | None = None) -> None:
    """Swap every layer a stage factorized (``rows`` of its report) for its k-bit twin, in place; tied heads follow.

    ``stats``: the stage's calibration statistics by target name. A linear whose input Gram is there is rounded by
    GPTQ's error compensation (low-rank: the right factor on the input, the left on what the rounded right gives),
    which keeps its output closer than rounding to nearest (row "rounding": "compensated" or "nearest").

    Each row gets ``bits``, ``group_size``, ``bytes_after`` (what the stored layer takes) and ``quantization_error``
    (relative Frobenius error of the quantized factors' product against the float factors'). A target the stage left
    dense is quantized as a dense matrix (status "dense, quantized"), so no target of a ``bits`` stage stays float.
    """

    for row in rows:
        gram = (stats or {}).get(row["name"], {}).get("input_gram") if row["kind"] != "embedding" else None
        if row.get("status") == "dense (not smaller)":
            _quantize_dense(model, row, bits, group_size, gram)
            row["rounding"] = "nearest" if gram is None else "compensated"
            continue
        if row.get("status") != "factorized":
            continue
        layer = model.get_submodule(row["name"])
        gram = gram if isinstance(layer, (LowRankLinear, ChannelLinear)) else None  # the layers that round on a Gram
        new = quantized_layer(layer, bits, group_size, gram)
        if new is not layer:
            row["rounding"] = "nearest" if gram is None else "compensated"
            with torch.no_grad():
                row["quantization_error"] = relative_error(layer.dense_weight(), new.dense_weight())
            carry_output_scale(layer, new)
            replace_module(model, row["name"], new)
            for name, module in list(model.named_modules()):
                if isinstance(module, TiedHead) and module.embedding is layer:
                    replace_module(model, name, TiedHead(new, module.embedding_name, module.bias))
        row.update(bits=bits, group_size=group_size, bytes_after=count_bytes(new), layer=type(new).__name__)
