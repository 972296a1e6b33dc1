"""Parameters and bytes, counting every factor, bias and stored buffer once (tied tensors are shared)."""

from __future__ import annotations

from torch import nn


def _unique(tensors):
    seen = set()
    for tensor in tensors:
        key = (tensor.data_ptr(), tensor.shape, tensor.dtype) if tensor.device.type != "meta" else id(tensor)
        if key not in seen:
            seen.add(key)
            yield tensor


def count_params(module: nn.Module) -> int:
    """Distinct parameters (a tied embedding/LM head counts once)."""
    return sum(p.numel() for p in _unique(module.parameters()))


def count_bytes(module: nn.Module) -> int:
    """Bytes of everything the model stores: parameters and persistent buffers (e.g. packed integers, scales)."""
    return sum(t.numel() * t.element_size() for t in _unique(module.state_dict(keep_vars=True).values()))


def module_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
