"""The base class of every factorized layer: how it describes itself for saving and is rebuilt for loading."""

from __future__ import annotations

from typing import Any

from torch import nn

LAYER_TYPES: dict[str, type["FactorizedModule"]] = {}


class FactorizedModule(nn.Module):
    """A module that replaces a dense one and can be rebuilt from a JSON config plus its state dict.

    Subclasses implement ``layer_config`` (JSON-safe shapes, ranks and flags) and ``from_config``
    (an empty module of the right shapes; ``model`` lets a layer find modules it shares weights with).
    Defining a subclass registers it under its class name, which is what the manifest stores.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        LAYER_TYPES[cls.__name__] = cls

    def layer_config(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict[str, Any], model: nn.Module) -> "FactorizedModule":
        raise NotImplementedError

    def dense_weight(self):
        """The dense matrix this layer stands for, in the layout of the module it replaced (for checks)."""
        raise NotImplementedError
