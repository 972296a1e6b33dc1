"""Factorized nn.Modules. Each saves as (class name, JSON config, state dict) and rebuilds with from_config."""

from lmshrink.errors import CorruptFile
from lmshrink.layers.base import LAYER_TYPES, LAYERS, FactorizedModule, register_layer
from lmshrink.layers.lowrank import LowRankEmbedding, LowRankLinear, TiedHead


def layer_type(name: str) -> type[FactorizedModule]:
    """The registered layer class of that name (a manifest names it); CorruptFile for one this lmshrink lacks."""
    if name not in LAYERS:
        raise CorruptFile(f"manifest names layer type {name!r}, which this lmshrink does not have ({', '.join(LAYERS.names())})")
    return LAYERS.get(name)


__all__ = ["FactorizedModule", "LAYERS", "LAYER_TYPES", "LowRankEmbedding", "LowRankLinear", "TiedHead", "layer_type",
           "register_layer"]
