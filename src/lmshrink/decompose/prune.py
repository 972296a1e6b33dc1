"""Magnitude pruning: keep the largest-magnitude entries of a matrix, zero the rest.

The baseline that low-rank methods are compared against at the same parameter count. Pure tensor math.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lmshrink.errors import InvalidArgument


def kept_count(numel: int, keep_ratio: float) -> int:
    """Entries a matrix of ``numel`` entries keeps at ``keep_ratio`` (rounded down, at least one)."""
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)) or not 0 < keep_ratio <= 1:
        raise InvalidArgument("keep_ratio", f"{keep_ratio!r} is outside (0, 1]", "0 < keep_ratio <= 1, the fraction of entries kept")
    return max(1, min(numel, math.floor(keep_ratio * numel + 1e-9)))


def magnitude_mask(weight: Tensor, keep_ratio: float) -> Tensor:
    """Boolean mask of the ``kept_count`` entries with largest |w| (ties broken by position, deterministic)."""
    keep = kept_count(weight.numel(), keep_ratio)
    flat = weight.detach().abs().reshape(-1).float()
    # topk on a stable sort order: equal magnitudes keep the earlier index, so the mask is reproducible.
    order = torch.argsort(flat, descending=True, stable=True)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=weight.device)
    mask[order[:keep]] = True
    return mask.view(weight.shape)


def magnitude_prune(weight: Tensor, keep_ratio: float) -> tuple[Tensor, Tensor]:
    """(pruned weight, mask): ``weight`` with all but the largest-|w| ``keep_ratio`` fraction of entries zeroed.

    ``mask`` is boolean with the shape of ``weight``; ``pruned = weight * mask`` in the weight's dtype.
    """
    if weight.dim() < 1 or weight.numel() == 0:
        raise InvalidArgument("weight", f"shape {tuple(weight.shape)} has no entries", "a non-empty tensor")
    mask = magnitude_mask(weight, keep_ratio)
    return weight.detach() * mask.to(weight.dtype), mask


def keep_ratio_for_lowrank(shape: tuple[int, int], rank: int, index_bits: int = 0, value_bits: int = 32) -> float:
    """Keep ratio a pruned m x n matrix needs to hold as many parameters as a rank-k factorization, k (m + n).

    With ``index_bits`` > 0 each kept entry also pays for its index (sparse storage), so fewer entries fit
    in the same bytes; the default counts values only, the usual "same parameter count" comparison.
    """
    m, n = shape
    budget = rank * (m + n) * value_bits / (value_bits + index_bits)
    return min(1.0, budget / (m * n))
