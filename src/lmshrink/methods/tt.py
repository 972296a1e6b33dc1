"""Tensor-train embeddings: "tt" (TensorGPT, one train per token row) and "tt-matrix" (the whole table as a TT-matrix).

How much is kept comes from the plan or the options (the options win):
  --tt-max-rank K / --rank K   cap on every TT rank
  --tt-tolerance e / --energy E  delta-truncation with relative error e (--energy E means e = sqrt(1 - E))
  --ratio R                     the largest uniform rank cap whose trains hold at most R x the dense table
Shapes: --tt-shape "8x8x9" factors d (default: balanced, --tt-order factors); --tt-vocab-shape factors V for
tt-matrix (default: balanced; a V that factors badly is padded with zero rows to a close V' that factors well).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmshrink.accounting import stays_dense
from lmshrink.bounds import Bounds
from lmshrink.decompose.tt import (
    balanced_factorization,
    padded_factorization,
    parse_shape,
    tt_matrix_svd,
    tt_svd_batched,
)
from lmshrink.errors import InvalidArgument
from lmshrink.layers.tt import TTEmbedding, TTMatrixEmbedding
from lmshrink.methods import MethodOptions, option, register_method

@dataclass(frozen=True)
class TTOptions(MethodOptions):
    tt_max_rank: int | None = option(None, "maximum TT rank (overrides --rank)", bounds=Bounds(1, 65536))
    tt_tolerance: float | None = option(None, "relative error tolerance eps in (0,1), delta-truncation",
                                        bounds=Bounds(0, 1, low_open=True, high_open=True))
    tt_shape: str = option("", "factors of the embedding dim d, e.g. 8x8x9 (default: balanced)")
    tt_order: int = option(3, "number of factors when shapes are chosen automatically", bounds=Bounds(1, 16))
    tt_cache_dense: bool = option(False, "keep a dense rebuild for tied-head logits (faster, uses V x d memory)")


@dataclass(frozen=True)
class TTMatrixOptions(TTOptions):
    tt_vocab_shape: str = option("", "factors of the vocabulary size V (default: balanced, padded if V factors badly)")


def _order(options) -> int:
    order = options.tt_order
    if isinstance(order, bool) or not isinstance(order, int) or order < 2:
        raise InvalidArgument("--tt-order", f"{order!r} is below 2", "an integer >= 2 (cores per train)")
    return order


def _dim_shape(options, dim: int) -> tuple[int, ...]:
    if options.tt_shape:
        return parse_shape(options.tt_shape, dim, "--tt-shape")
    return balanced_factorization(dim, _order(options))


def _truncation(plan, options) -> tuple[int | None, float | None]:
    """(max rank, tolerance) from the options, else from --rank / --energy."""
    max_rank = options.tt_max_rank
    if max_rank is not None and (isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank <= 0):
        raise InvalidArgument("--tt-max-rank", f"{max_rank!r} is not a positive integer", "an integer >= 1")
    if max_rank is None and plan.rank is not None:
        max_rank = plan.rank
    tolerance = options.tt_tolerance
    if tolerance is not None and not 0 < tolerance < 1:
        raise InvalidArgument("--tt-tolerance", f"{tolerance!r} is outside (0, 1)", "a relative error eps with 0 < eps < 1")
    if tolerance is None and plan.energy is not None and plan.energy < 1:
        tolerance = math.sqrt(1 - plan.energy)
    return max_rank, tolerance


def uniform_ranks(sizes: tuple[int, ...], cap: int | None) -> list[int]:
    """TT ranks of an exact train of mode sizes ``sizes`` capped at ``cap``: r_k = min(cap, prod left, prod right)."""
    ranks = [1]
    for k in range(1, len(sizes)):
        bound = min(math.prod(sizes[:k]), math.prod(sizes[k:]))
        ranks.append(bound if cap is None else min(cap, bound))
    return ranks + [1]


def train_parameters(sizes: tuple[int, ...], cap: int | None) -> int:
    ranks = uniform_ranks(sizes, cap)
    return sum(ranks[k] * n * ranks[k + 1] for k, n in enumerate(sizes))


def cap_for_ratio(sizes: tuple[int, ...], copies: int, dense: int, ratio: float, what: str) -> int:
    """The largest rank cap whose ``copies`` trains of mode sizes ``sizes`` hold at most ratio x dense parameters."""
    largest = max(uniform_ranks(sizes, None))
    best = None
    for cap in range(1, largest + 1):
        if copies * train_parameters(sizes, cap) <= ratio * dense:
            best = cap
    if best is None:
        smallest = copies * train_parameters(sizes, 1) / dense
        raise InvalidArgument("--ratio", f"{ratio:g} is below what {what} reaches even at TT rank 1 ({smallest:.4g})",
                              f"--ratio >= {smallest:.4g}, or a longer train (--tt-order / --tt-shape with more factors)")
    return best


@register_method(
    "tt",
    kind="module",
    summary="TensorGPT: every embedding row as its own tensor train (batched TT-SVD)",
    options=TTOptions,
    target_kinds=("embedding",),
)
def tt(target, plan, stats, options):
    weight = target.weight().detach()
    vocab, dim = weight.shape
    shape = _dim_shape(options, dim)
    max_rank, tolerance = _truncation(plan, options)
    if plan.ratio is not None:
        cap = cap_for_ratio(shape, vocab, vocab * dim, plan.ratio, f"a per-token train of shape {'x'.join(map(str, shape))}")
        max_rank = cap if max_rank is None else min(max_rank, cap)
    trains = tt_svd_batched(weight, shape, max_rank=max_rank, tolerance=tolerance)
    if stays_dense(trains.stored_parameter_count(), vocab * dim):
        return None  # the padded trains would not be smaller than the table
    return TTEmbedding.from_trains(trains, getattr(target.module, "padding_idx", None), options.tt_cache_dense, dtype=weight.dtype)


@register_method(
    "tt-matrix",
    kind="module",
    summary="the whole embedding table as one TT-matrix (TT-SVD of the reshaped V x d table)",
    options=TTMatrixOptions,
    target_kinds=("embedding",),
)
def tt_matrix(target, plan, stats, options):
    weight = target.weight().detach()
    vocab, dim = weight.shape
    shape = _dim_shape(options, dim)
    if options.tt_vocab_shape:
        vocab_shape = parse_shape(options.tt_vocab_shape, vocab, "--tt-vocab-shape")
        if len(vocab_shape) != len(shape):
            raise InvalidArgument("--tt-vocab-shape", f"has {len(vocab_shape)} factors but the d shape has {len(shape)}",
                                  "as many factors for V as for d")
    else:
        vocab_shape = padded_factorization(vocab, len(shape))
    max_rank, tolerance = _truncation(plan, options)
    merged = tuple(v * n for v, n in zip(vocab_shape, shape))
    if plan.ratio is not None:
        cap = cap_for_ratio(merged, 1, vocab * dim, plan.ratio, "a TT-matrix")
        max_rank = cap if max_rank is None else min(max_rank, cap)
    table = weight.float()
    padded_vocab = math.prod(vocab_shape)
    if padded_vocab > vocab:
        table = table.new_zeros(padded_vocab, dim)
        table[:vocab] = weight
    cores = tt_matrix_svd(table, vocab_shape, shape, max_rank=max_rank, tolerance=tolerance)
    if stays_dense(sum(core.numel() for core in cores), vocab * dim):
        return None
    return TTMatrixEmbedding.from_cores(cores, vocab, getattr(target.module, "padding_idx", None),
                                        options.tt_cache_dense, dtype=weight.dtype)
