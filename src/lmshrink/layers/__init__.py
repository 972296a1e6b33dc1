"""Factorized nn.Modules. Each saves as (class name, JSON config, state dict) and rebuilds with from_config."""

from lmshrink.layers.base import LAYER_TYPES, FactorizedModule
from lmshrink.layers.lowrank import LowRankEmbedding, LowRankLinear, TiedHead


def layer_type(name: str) -> type[FactorizedModule]:
    """The registered layer class of that name, importing every layer module first."""
    import importlib
    import pkgutil

    import lmshrink.layers as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"lmshrink.layers.{info.name}")
    if name not in LAYER_TYPES:
        from lmshrink.errors import CorruptFile

        raise CorruptFile(f"manifest names layer type {name!r}, which this lmshrink does not have ({', '.join(sorted(LAYER_TYPES))})")
    return LAYER_TYPES[name]


__all__ = ["FactorizedModule", "LAYER_TYPES", "LowRankEmbedding", "LowRankLinear", "TiedHead", "layer_type"]
