"""Parameters and bytes, counting every factor, bias and stored buffer once (tied tensors are shared)."""

from __future__ import annotations

import torch
from torch import nn

from lmshrink.decompose.svd import lowrank_params


def _unique(tensors):
    seen = set()
    for tensor in tensors:
        key = (tensor.data_ptr(), tensor.shape, tensor.dtype) if tensor.device.type != "meta" else id(tensor)
        if key not in seen:
            seen.add(key)
            yield tensor


def count_params(module: nn.Module) -> int:
    """Distinct parameters (a tied embedding/LM head counts once) plus the values held packed in buffers (a quantized
    matrix's ``stored_values``: its rows x columns integers, which stand for parameters; scales are not counted)."""
    return sum(p.numel() for p in _unique(module.parameters())) + _packed_values(module)


def _packed_values(module: nn.Module) -> int:
    return sum(int(m.stored_values) for m in module.modules() if isinstance(getattr(m, "stored_values", None), int))


def count_bytes(module: nn.Module) -> int:
    """Bytes of everything the model stores: parameters and persistent buffers (e.g. packed integers, scales)."""
    return sum(t.numel() * t.element_size() for t in _unique(module.state_dict(keep_vars=True).values()))


def module_params(module: nn.Module) -> int:
    """One module's parameters and packed values (as count_params counts them, without sharing)."""
    return sum(p.numel() for p in module.parameters()) + _packed_values(module)


# The one rule for "stays dense": a replacement is made only when it stores fewer parameters than the dense matrix
# it replaces. Every place that decides it (allocations, the budget, module methods, the report) calls these.

def stays_dense(stored_params: int, dense_params: int) -> bool:
    """Whether a replacement storing ``stored_params`` values is not smaller than the ``dense_params`` it replaces."""
    return stored_params >= dense_params


def keep_if_smaller(rank: int, shape: tuple[int, int]) -> int | None:
    """``rank``, or None (stays dense) when its factors would hold at least as many parameters as the matrix."""
    return None if stays_dense(lowrank_params(rank, shape), shape[0] * shape[1]) else rank


def largest_smaller_rank(shape: tuple[int, int], multiple_of: int = 1) -> int | None:
    """The largest rank (a multiple of ``multiple_of``, at most min(m, n)) that keep_if_smaller keeps; None if none."""
    m, n = shape
    rank = (m * n - 1) // (m + n)  # the largest k with k (m + n) < m n, i.e. not stays_dense
    if multiple_of > 1:
        rank = rank // multiple_of * multiple_of
    rank = min(rank, min(shape))
    return rank if rank >= 1 else None


def relative_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """||W - approx|| / ||W|| (Frobenius), in float32; what the reports call a matrix's relative error."""
    weight = weight.detach().float()
    return float(torch.linalg.norm(weight - approx.detach().float()) / torch.linalg.norm(weight).clamp_min(1e-30))
