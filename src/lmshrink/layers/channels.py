"""A linear layer with some of its output rows or input columns removed (channel selection, lmshrink.methods.nystrom)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmshrink.errors import CorruptFile
from lmshrink.layers.base import FactorizedModule, config_bool, config_field, config_int, register_layer

SIDES = ("rows", "columns")


def check_channels(layer: str, in_features: int, out_features: int, side: str, dense_features: int) -> int:
    """How many channels a narrowed layer's config keeps; a config that cannot be one is a CorruptFile."""
    if side not in SIDES:
        raise CorruptFile(f"{layer} config 'side' is {side!r}; allowed: {', '.join(SIDES)}")
    kept = out_features if side == "rows" else in_features
    if kept > dense_features:
        raise CorruptFile(f"{layer} keeps {kept} of {dense_features} {side}; allowed: at most all of them")
    return kept


def scatter_channels(weight: Tensor, kept: Tensor, side: str, dense_features: int) -> Tensor:
    """The dense matrix a narrowed one stands for: ``weight``'s rows (or columns) at the ``kept`` channels of
    ``dense_features``, zeros at the removed ones."""
    kept = kept.long()
    if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= dense_features):
        raise CorruptFile(f"a channel layer keeps channel indices outside [0, {dense_features})")
    if side == "rows":
        return weight.new_zeros(dense_features, weight.shape[1]).index_copy(0, kept, weight)
    return weight.new_zeros(weight.shape[0], dense_features).index_copy(1, kept, weight)


@register_layer
class ChannelLinear(FactorizedModule):
    """y = x @ weight.T + bias with ``weight`` the kept rows (a producer: fewer outputs) or kept columns (a consumer:
    fewer inputs) of a ``dense_out`` x ``dense_in`` matrix; ``kept`` (int32) says which, for ``dense_weight``."""

    def __init__(self, in_features: int, out_features: int, side: str, dense_features: int, bias: bool = False,
                 dtype=None, device=None):
        super().__init__()
        kept = check_channels(type(self).__name__, in_features, out_features, side, dense_features)
        self.in_features, self.out_features, self.side, self.dense_features = in_features, out_features, side, dense_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device))
        self.register_buffer("kept", torch.zeros(kept, dtype=torch.int32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_weight(cls, weight: Tensor, kept: Tensor, side: str, dense_features: int, bias: Tensor | None = None) -> "ChannelLinear":
        layer = cls(weight.shape[1], weight.shape[0], side, dense_features, bias is not None, dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.kept.copy_(kept.to(torch.int32))
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def dense_weight(self) -> Tensor:
        """The map on the dense layer's inputs and outputs: zeros at the removed channels."""
        return scatter_channels(self.weight, self.kept, self.side, self.dense_features)

    def layer_config(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "side": self.side,
                "dense_features": self.dense_features, "bias": self.bias is not None}

    @classmethod
    def from_config(cls, config: dict[str, Any], model: nn.Module) -> "ChannelLinear":
        name = cls.__name__
        return cls(config_int(config, "in_features", name), config_int(config, "out_features", name),
                   config_field(config, "side", name), config_int(config, "dense_features", name),
                   config_bool(config, "bias", name))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{self.side} kept of {self.dense_features}, bias={self.bias is not None}")
