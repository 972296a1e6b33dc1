"""Compression methods: one file each, registered by name.

Two kinds exist. A *low-rank* method is a function
``(weight (out, in) float, rank, stats, options) -> (left (out, k), right (k, in))``; the surgery turns its
factors into ``LowRankLinear`` / ``LowRankEmbedding``. A *module* method is a function
``(target, plan, stats, options) -> nn.Module | None`` that builds the replacement itself (tensor trains,
GroupReduce blocks, pruning, factorized LSTMs); ``None`` means the target stays dense.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable

from lmshrink.bounds import Bounds, check_number
from lmshrink.errors import InvalidArgument


@dataclass(frozen=True)
class MethodOption:
    """A method-specific parameter; the CLI exposes it as ``--<name>`` on ``lmshrink compress``.

    A numeric option (int, float) is checked against ``bounds`` (default: any integer, any finite number);
    a default of None means "not given" and is always allowed.
    """

    name: str
    type: type
    default: Any
    help: str
    choices: tuple | None = None
    bounds: Bounds | None = None

    @property
    def flag(self) -> str:
        return f"--{self.name.replace('_', '-')}"

    def check(self, value: Any) -> Any:
        """``value`` if this option allows it; else InvalidArgument naming the option's flag."""
        if self.choices is not None and value not in self.choices:
            raise InvalidArgument(self.flag, f"{value!r} is not supported", ", ".join(map(str, self.choices)))
        if value is None and self.default is None:
            return value
        if self.type in (int, float):
            return check_number(self.flag, value, self.type, self.bounds)
        if self.type is bool and not isinstance(value, bool):
            raise InvalidArgument(self.flag, f"{value!r} is not true or false", "True or False")
        return value


@dataclass(frozen=True)
class Method:
    name: str
    function: Callable
    kind: str = "lowrank"  # "lowrank" or "module"
    summary: str = ""
    needs: frozenset[str] = frozenset()  # calibration statistics, see lmshrink.calibration
    options: tuple[MethodOption, ...] = ()
    target_kinds: frozenset[str] = frozenset({"linear", "embedding"})

    def resolve_options(self, given: dict[str, Any] | None) -> dict[str, Any]:
        """Defaults filled in; unknown names rejected so a typo never passes silently."""
        given = dict(given or {})
        known = {o.name: o for o in self.options}
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise InvalidArgument(
                "options", f"method {self.name!r} has no option(s) {unknown}", f"{sorted(known) or 'none'}"
            )
        return {name: option.check(given.get(name, option.default)) for name, option in known.items()}


METHODS: dict[str, Method] = {}


def register_method(
    name: str,
    *,
    kind: str = "lowrank",
    summary: str = "",
    needs: tuple[str, ...] = (),
    options: tuple[MethodOption, ...] = (),
    target_kinds: tuple[str, ...] = ("linear", "embedding"),
) -> Callable[[Callable], Callable]:
    """Decorator that adds a method to the registry under ``name``."""
    if kind not in ("lowrank", "module"):
        raise ValueError(f"kind must be 'lowrank' or 'module', got {kind!r}")

    def decorate(function: Callable) -> Callable:
        METHODS[name] = Method(
            name, function, kind, summary or (function.__doc__ or "").strip().split("\n")[0],
            frozenset(needs), tuple(options), frozenset(target_kinds),
        )
        return function

    return decorate


def _import_all() -> None:
    # Every module in this package registers its methods on import.
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def get_method(name: str) -> Method:
    _import_all()
    if name not in METHODS:
        raise InvalidArgument("--method", f"unknown method {name!r}", ", ".join(sorted(METHODS)))
    return METHODS[name]


def all_methods() -> dict[str, Method]:
    _import_all()
    return dict(sorted(METHODS.items()))
