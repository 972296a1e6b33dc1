"""GPTQ (Frantar et al. 2023): k-bit quantization that compensates each rounding error on calibration inputs
(lmshrink.decompose.quantize.quantize_compensated). Stored exactly like the ``quantize`` method's layers (packed
integers + float16 scale and minimum per row or column group), so bytes are the same; only the output error differs.
``--bits`` / ``--quant-group`` (Plan.bits / group_size) as for ``quantize``; 4 bits when none are given.

Linears and output layers use their input Gram. An embedding tied to the output layer uses the head's (the final
hidden states), so its logits are what is kept; an untied embedding is looked up by one-hot token ids, whose Gram is
diagonal, so GPTQ reduces to round to nearest there (stored as such: a recipe may name every table, tied or not).

``--rare-bits B --rare-share S`` store the share S of an embedding's rows used least (token counts; ties: higher ids
first) at B bits, the rest at ``--bits`` (a MixedBitsEmbedding). Rows are rounded
independently (one row's error is spread over its own columns), so the common rows come out as they would alone.
With ``--rare-reference`` (the default) the counts of lmshrink's reference text (Python's prose and code,
lmshrink.data.reference_text), scaled to the calibration text's total, are added to its counts: calibrated on WikiText-2,
whose format has no bare newline and no punctuation without a space before it, SmolLM2's 2-bit half of the rows
otherwise held 35-43% of the tokens of ordinary prose and code (rare_rows_smollm2-135m.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmshrink.bounds import Bounds
from lmshrink.decompose.quantize import SUPPORTED_BITS, check_bits, quantize, quantize_compensated
from lmshrink.errors import InvalidArgument
from lmshrink.layers.lowrank import linear_weight
from lmshrink.layers.quantized import MixedBitsEmbedding, QuantizedEmbedding, QuantizedLinear
from lmshrink.methods import MethodOptions, option, register_method, required_stat
from lmshrink.methods.quantize import BITS, QUANT_GROUP


@dataclass(frozen=True)
class GPTQOptions(MethodOptions):
    bits: int = option(4, f"bits per stored value, one of {SUPPORTED_BITS}", bounds=BITS)
    quant_group: int = option(0, "columns sharing one scale (0: one scale per row)", bounds=QUANT_GROUP)
    gptq_damping: float = option(0.01, "added to the input Gram's diagonal, as a share of its mean (keeps its inverse stable)",
                                 bounds=Bounds(0, 1000, low_open=True))
    rare_bits: int = option(0, f"bits of an embedding's rarest rows (--rare-share of them), one of {SUPPORTED_BITS}; 0: every "
                               "row at --bits", bounds=BITS)
    rare_share: float = option(0.0, "share of an embedding's rows, least used first (see --rare-reference), stored at "
                                    "--rare-bits", bounds=Bounds(0, 1, high_open=True))
    rare_reference: bool = option(True, "count the rows' use in lmshrink's reference text (Python's prose and code) too, "
                                        "so tokens that most text needs are not rare for a calibration text that lacks them")

    @property
    def mixed(self) -> bool:
        return bool(self.rare_bits) and self.rare_share > 0


def rare_row_count(vocab: int, share: float) -> int:
    """How many of ``vocab`` rows a --rare-share of ``share`` stores at --rare-bits (shared with budget predictions)."""
    return min(vocab - 1, max(1, round(share * vocab)))  # at least one row each way: both parts exist


def rare_rows(counts: torch.Tensor, share: float, reference: torch.Tensor | None = None) -> torch.Tensor:
    """A bool per row: the ``share`` of rows with the lowest ``counts`` (ties: higher ids first, as later vocabulary
    entries of BPE-style tokenizers tend to be the rarer ones). ``reference``: counts of another text, scaled to the
    same total and added first (each text weighs half)."""
    if reference is not None and reference.sum() > 0:
        counts = counts.double() + reference.double() * (counts.sum().double() / reference.sum().double())
    vocab = counts.numel()
    descending_ids = torch.arange(vocab - 1, -1, -1)
    order = descending_ids[torch.argsort(counts[descending_ids], stable=True)]
    rare = torch.zeros(vocab, dtype=torch.bool)
    rare[order[:rare_row_count(vocab, share)]] = True
    return rare


@register_method(
    "gptq",
    kind="module",
    summary="GPTQ: k-bit quantization, rounding errors compensated on calibration inputs (input Gram; tied embeddings: the head's)",
    needs=("input_gram",),
    needs_when={"token_counts": lambda options: options.mixed,
                "reference_token_counts": lambda options: options.mixed and options.rare_reference},
    options=GPTQOptions,
    target_kinds=("linear", "lm_head", "embedding"),
)
def gptq(target, plan, stats, options: GPTQOptions):
    bits = check_bits(options.bits, "--bits")
    group = options.quant_group or None
    embedding = target.kind == "embedding"
    if bool(options.rare_bits) != (options.rare_share > 0):
        raise InvalidArgument("--rare-share" if options.rare_bits else "--rare-bits", "is needed with "
                              + ("--rare-bits" if options.rare_bits else "--rare-share"), "both (mixed rows), or neither")
    if options.mixed:
        return _mixed_table(target, stats, options, group)
    if embedding and not target.tied_head:
        # Its inputs are one-hot token ids, whose Gram is diagonal: nothing to compensate across columns, so GPTQ's
        # answer is round to nearest, and that is what is stored.
        return QuantizedEmbedding.from_embedding(target.module, bits, group)
    weight = (target.module.weight if embedding else linear_weight(target.module)).detach()
    quantized = quantize_compensated(weight, bits, group, _gram(stats, weight), options.gptq_damping)
    if embedding:
        return QuantizedEmbedding.from_embedding(target.module, bits, quantized=quantized)
    return QuantizedLinear.from_linear(target.module, bits, quantized=quantized)


def _gram(stats: dict, weight: torch.Tensor) -> torch.Tensor:
    return required_stat(stats, "input_gram", "gptq", (weight.shape[1], weight.shape[1])).to(weight.device)


def _mixed_table(target, stats, options: GPTQOptions, group: int | None) -> MixedBitsEmbedding:
    """The embedding's rare rows at --rare-bits, the others at --bits, each set rounded as gptq rounds the whole."""
    if target.kind != "embedding":
        raise InvalidArgument("--rare-bits", f"applies to embedding tables (rows = tokens); {target.name} is a {target.kind}",
                              "a stage on the embedding (tied or not), or --rare-bits 0 on other targets")
    check_bits(options.rare_bits, "--rare-bits")
    weight = target.module.weight.detach()
    counts = stats.get("token_counts")
    if counts is None:
        raise InvalidArgument("--rare-bits", "needs token counts of the calibration text, and none were counted (the model "
                              "has no tokenizer)", "a model with a tokenizer and text calibration data, or --rare-bits 0")
    reference = stats.get("reference_token_counts") if options.rare_reference else None
    rare = rare_rows(counts.check_vocab(weight.shape[0], "--rare-bits").counts, options.rare_share,
                     reference.check_vocab(weight.shape[0], "--rare-reference").counts if reference is not None else None)
    rare = rare.to(weight.device)
    if target.tied_head:  # rows are rounded independently: each set on the head's input Gram, as the whole would be
        gram = _gram(stats, weight)
        parts = [quantize_compensated(weight[rows], b, group, gram, options.gptq_damping)
                 for rows, b in ((~rare, options.bits), (rare, options.rare_bits))]
    else:  # looked up by one-hot ids: round to nearest (see the module docstring)
        parts = [quantize(weight[rows], b, group) for rows, b in ((~rare, options.bits), (rare, options.rare_bits))]
    return MixedBitsEmbedding.from_parts(target.module, rare, *parts)
