"""The base class of every factorized layer: how it describes itself for saving and is rebuilt for loading."""

from __future__ import annotations

from typing import Any, TypeVar

from torch import nn

from lmshrink.errors import CorruptFile
from lmshrink.registry import Registry

# Layer classes by class name, which is what a manifest stores; every module of lmshrink.layers may hold some.
LAYERS: Registry[type["FactorizedModule"]] = Registry("layer type", "layer", package="lmshrink.layers")
# A dict-like view (``LAYER_TYPES[name]``, iteration) for the loaders and export.
LAYER_TYPES = LAYERS.mapping()

# No dimension of a stored tensor comes near this; it keeps shape arithmetic on hostile configs far from overflow.
MAX_DIMENSION = 2 ** 40


class FactorizedModule(nn.Module):
    """A module that replaces a dense one and can be rebuilt from a JSON config plus its state dict.

    Subclasses implement ``layer_config`` (JSON-safe shapes, ranks and flags) and ``from_config``
    (an empty module of the right shapes; ``model`` lets a layer find modules it shares weights with).
    A concrete subclass is decorated with ``@register_layer``, which registers it under its class name (what
    the manifest stores).
    """

    def layer_config(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict[str, Any], model: nn.Module) -> "FactorizedModule":
        raise NotImplementedError

    def dense_weight(self):
        """The dense matrix this layer stands for, in the layout of the module it replaced (for checks)."""
        raise NotImplementedError

    output_scale = 1.0  # what forward's output is multiplied by (set_output_scale); saved in the manifest

    def set_output_scale(self, scale: float) -> None:
        """Multiply this layer's forward output by ``scale``, but not the logits it gives a tied head: what a scaled
        word embedding does to its lookups (Gemma's ``embed_scale``, sqrt(hidden size)), kept when it is factorized."""
        self.output_scale = float(scale)
        if self.output_scale != 1.0 and getattr(self, "_scale_hook", None) is None:
            self._scale_hook = self.register_forward_hook(lambda module, args, output: output * module.output_scale)


def carry_output_scale(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` (a factorized layer replacing ``old``) the scale ``old`` applies to its lookups, if any: a
    FactorizedModule's ``output_scale`` or a scaled word embedding's ``embed_scale`` buffer (Gemma 3)."""
    scale = getattr(old, "output_scale", None)
    if scale is None and getattr(old, "embed_scale", None) is not None:
        scale = float(old.embed_scale)
    if scale is not None and float(scale) != 1.0 and isinstance(new, FactorizedModule):
        new.set_output_scale(float(scale))


Layer = TypeVar("Layer", bound=type[FactorizedModule])


def register_layer(cls: Layer) -> Layer:
    """Class decorator: a FactorizedModule subclass that manifests may name (by its class name)."""
    return LAYERS.register(cls.__name__, cls)


# Validators for ``from_config``: a manifest is untrusted input, so every value is checked for its type and range
# before it sizes anything. Each failure is one line naming the layer type and the key (the loader adds the module).

def _refuse(layer: str, key: str, value: Any, allowed: str) -> CorruptFile:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return CorruptFile(f"{layer} config {key!r} is {shown}; allowed: {allowed}")


def config_field(config: Any, key: str, layer: str) -> Any:
    if not isinstance(config, dict):
        raise CorruptFile(f"{layer} config is a {type(config).__name__}; allowed: a JSON object")
    if key not in config:
        raise CorruptFile(f"{layer} config lacks {key!r}")
    return config[key]


def config_int(config: Any, key: str, layer: str, minimum: int = 1, optional: bool = False, default: Any = ...) -> int | None:
    """An integer in [minimum, MAX_DIMENSION] (bools refused), or None when ``optional``; ``default`` when absent."""
    if default is not ... and isinstance(config, dict) and key not in config:
        return default
    value = config_field(config, key, layer)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= MAX_DIMENSION:
        raise _refuse(layer, key, value, f"an integer >= {minimum}" + (" or null" if optional else ""))
    return value


def config_bool(config: Any, key: str, layer: str, default: Any = ...) -> bool:
    if default is not ... and isinstance(config, dict) and key not in config:
        return default
    value = config_field(config, key, layer)
    if not isinstance(value, bool):
        raise _refuse(layer, key, value, "true or false")
    return value


def config_int_list(config: Any, key: str, layer: str, minimum: int = 1) -> list[int]:
    value = config_field(config, key, layer)
    if (not isinstance(value, list) or not value
            or any(isinstance(v, bool) or not isinstance(v, int) or not minimum <= v <= MAX_DIMENSION for v in value)):
        raise _refuse(layer, key, value, f"a non-empty list of integers >= {minimum}")
    return value


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule called ``name`` (dotted) is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
