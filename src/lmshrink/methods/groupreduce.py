"""GroupReduce (Chen et al., NeurIPS 2018): frequency-aware block low-rank embedding and output (softmax) matrices."""

from __future__ import annotations

from dataclasses import dataclass

from lmshrink.accounting import stays_dense
from lmshrink.bounds import Bounds
from lmshrink.decompose.groupreduce import RANK_RULES, SPLITS, budget_for_ratio, groupreduce
from lmshrink.decompose.quantize import SUPPORTED_BITS, check_bits
from lmshrink.errors import InvalidArgument
from lmshrink.frequencies import Frequencies
from lmshrink.layers.block import BlockLowRankEmbedding, BlockLowRankOutput
from lmshrink.methods import MethodOptions, option, register_method
from lmshrink.methods.quantize import BITS, QUANT_GROUP

@dataclass(frozen=True)
class GroupReduceOptions(MethodOptions):
    groups: int = option(8, "number of frequency groups the vocabulary is split into", bounds=Bounds(1, 65536))
    refine_steps: int = option(5, "rounds of moving tokens to the group that reconstructs them best (0: none)",
                               bounds=Bounds(0, 1000))
    weight_power: float = option(0.5, "row weight = token count ** power (0 unweighted, 1 raw frequency)", bounds=Bounds(0, 10))
    split: str = option("equal", "initial split, equal-size groups or geometric sizes", choices=SPLITS)
    rank_rule: str = option("frequency", "ranks proportional to group frequency, or greedy by weighted error", choices=RANK_RULES)
    bits: int = option(0, f"bits per stored factor value, one of {SUPPORTED_BITS}, as --bits gives any method (Plan.bits); 0 keeps float factors", bounds=BITS)
    quant_group: int = option(0, "with --bits: factor columns sharing one scale (Plan.group_size; 0: one scale per row)", bounds=QUANT_GROUP)
    frequencies: str = option("", "a frequency table file (Frequencies.save); default: count the calibration text")


def block_budget(shape: tuple[int, int], plan) -> int:
    """Factor parameters allowed: ``--ratio`` of the dense table, or what a rank-K SVD would take (``--rank K``)."""
    if plan.ratio is not None:
        return budget_for_ratio(shape, plan.ratio)
    if plan.rank is not None:
        return plan.rank * (shape[0] + shape[1])
    raise InvalidArgument("--energy", "groupreduce has no energy rule", "--ratio R (fraction of dense parameters) or --rank K")


def resolve_frequencies(stats: dict, options: GroupReduceOptions, vocab: int) -> Frequencies:
    if options.frequencies:
        table = Frequencies.load(options.frequencies)
    elif "token_counts" in stats:
        table = stats["token_counts"]
    else:
        raise InvalidArgument("--frequencies", "no token frequencies were given or counted",
                              "a table file (--frequencies PATH) or calibration text (--data) to count them on")
    return table.check_vocab(vocab)


@register_method(
    "groupreduce",
    kind="module",
    summary="GroupReduce: frequency-grouped, frequency-weighted block low-rank embedding/LM head (+ optional k-bit factors)",
    needs=("token_counts",),
    options=GroupReduceOptions,
    target_kinds=("embedding", "lm_head"),
)
def groupreduce_method(target, plan, stats, options: GroupReduceOptions):
    weight = target.weight().detach()
    vocab, dim = weight.shape
    table = resolve_frequencies(stats, options, vocab)
    bits = options.bits or None
    if bits is not None:
        check_bits(bits, "--bits")
    budget = block_budget((vocab, dim), plan)
    factors = groupreduce(weight.float(), table.smoothed(), budget, groups=options.groups,
                          weight_power=options.weight_power, split=options.split,
                          rank_rule=options.rank_rule, refine_steps=options.refine_steps)
    if bits is None and stays_dense(factors.params(), vocab * dim):
        return None  # k-bit factors are kept even at as many values: they take fewer bytes
    config = dict(bits=bits, group_size=options.quant_group or None, frequencies=table.to_dict(), dtype=weight.dtype)
    if target.kind == "embedding":
        return BlockLowRankEmbedding.from_factors(factors, padding_idx=getattr(target.module, "padding_idx", None), **config)
    bias = getattr(target.module, "bias", None)
    layer = BlockLowRankOutput.from_factors(factors, bias=bias is not None, **config)
    if bias is not None:
        layer.bias.data.copy_(bias.detach())
    return layer
