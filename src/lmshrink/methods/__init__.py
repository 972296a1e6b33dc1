"""Compression methods: one file each, registered by name in METHODS.

Two kinds exist. A *low-rank* method is a function
``(weight (out, in) float, rank, stats, options) -> (left (out, k), right (k, in))``; the surgery turns its
factors into ``LowRankLinear`` / ``LowRankEmbedding``. A *module* method is a function
``(target, plan, stats, options) -> nn.Module | None`` that builds the replacement itself (tensor trains,
GroupReduce blocks, pruning, factorized LSTMs); ``None`` means the target stays dense. A module method that works
on several modules at once (nystrom: an MLP's linears) says how to group the targets (``group_targets``); its
function is then called once, with all the grouped targets (a group is a Target with ``members``), the whole
``{target name: statistics}`` and the plan, so it can allocate across groups itself; it returns
``{member name: module}`` (a name left out stays dense).

Each method declares its options as a frozen dataclass deriving from ``MethodOptions`` whose fields carry their
type, default, help and bounds (``option(...)``); ``Method.resolve_options`` turns what the user gave (a dict, as
``Plan.options`` keeps it) into an instance with that method's own defaults. A low-rank method also says how it
scores the loss of each rank-one component (``error_spectrum``), which the sensitivity allocation spends its
budget on.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Union

import torch

from lmshrink.bounds import Bounds, check_number
from lmshrink.errors import InvalidArgument
from lmshrink.registry import Registry


@dataclass(frozen=True)
class MethodOption:
    """A method-specific parameter as the CLI and ``lmshrink methods`` show it: ``--<name>`` on ``lmshrink compress``.

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
        if self.type is str and not isinstance(value, str):
            raise InvalidArgument(self.flag, f"{value!r} is not text", "a string")
        return value


def option(default: Any, help: str, *, bounds: Bounds | None = None, choices: tuple | None = None):
    """A field of a MethodOptions dataclass: its default, its help line, and what values it allows."""
    return dataclasses.field(default=default, metadata={"help": help, "bounds": bounds, "choices": choices})


@dataclass(frozen=True)
class MethodOptions:
    """Base of every method's options (a frozen dataclass of ``option(...)`` fields); the method ``svd`` has none."""

    @classmethod
    def describe(cls) -> tuple[MethodOption, ...]:
        """Each field as a MethodOption (its type without ``| None``), in declaration order."""
        hints = typing.get_type_hints(cls)
        described = []
        for spec in dataclasses.fields(cls):
            kind = hints[spec.name]
            if typing.get_origin(kind) in (Union, types.UnionType):
                kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
            described.append(MethodOption(spec.name, kind, spec.default, spec.metadata.get("help", ""),
                                          spec.metadata.get("choices"), spec.metadata.get("bounds")))
        return tuple(described)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def required_stat(stats: dict, name: str, method: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """stats[name], checked: present (else a one-line error naming the method) and of ``shape`` when given."""
    if name not in stats:
        raise InvalidArgument("stats", f"method {method!r} needs the calibration statistic {name!r}, which is missing",
                              "statistics from lmshrink.calibration.collect_stats (compress() gathers them when given data)")
    value = stats[name]
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise InvalidArgument("stats", f"{name!r} has shape {tuple(value.shape)}", f"shape {tuple(shape)} for this matrix")
    return value


def plain_spectrum(weight: torch.Tensor, stats: dict, options: MethodOptions) -> tuple[torch.Tensor, bool]:
    """The default error spectrum: squared singular values of W, as a fraction of their total (relative error)."""
    values = torch.linalg.svdvals(weight.detach().double()) ** 2
    return values / values.sum().clamp_min(1e-300), False


@dataclass(frozen=True)
class Method:
    name: str
    function: Callable
    kind: str = "lowrank"  # "lowrank" or "module"
    summary: str = ""
    needs: frozenset[str] = frozenset()  # calibration statistics, see lmshrink.calibration
    options_type: type[MethodOptions] = MethodOptions
    target_kinds: frozenset[str] = frozenset({"linear", "embedding"})
    # (weight (out, in), stats, options) -> (error of dropping each rank-one component, descending; whether it is in
    # loss units, comparable across matrices, or relative to the matrix's total)
    spectrum: Callable[[torch.Tensor, dict, MethodOptions], tuple[torch.Tensor, bool]] = plain_spectrum
    # (targets) -> targets with some replaced by groups of them (module methods only; None: one target at a time)
    group_targets: Callable[[list], list] | None = None
    # statistic -> (options) -> whether these options need it too (beyond ``needs``): gptq's token counts for rare rows
    needs_when: tuple[tuple[str, Callable[[MethodOptions], bool]], ...] = ()

    @property
    def options(self) -> tuple[MethodOption, ...]:
        return self.options_type.describe()

    def needs_for(self, options: dict[str, Any] | MethodOptions | None) -> frozenset[str]:
        """The calibration statistics a run with these options needs: ``needs`` and those some options add."""
        resolved = self.resolve_options(options)
        return self.needs | {stat for stat, wanted in self.needs_when if wanted(resolved)}

    def resolve_options(self, given: dict[str, Any] | MethodOptions | None) -> MethodOptions:
        """This method's options: what was given (checked against each option's type and bounds), defaults for the rest.

        Unknown names are rejected, naming this method's own options, so a typo never passes silently.
        """
        if isinstance(given, self.options_type):
            return given
        given = dict(given or {})
        known = {o.name: o for o in self.options}
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise InvalidArgument(
                "options", f"method {self.name!r} has no option(s) {unknown}", f"{sorted(known) or 'none'}"
            )
        return self.options_type(**{name: o.check(given.get(name, o.default)) for name, o in known.items()})

    def error_spectrum(self, weight: torch.Tensor, stats: dict, options: dict[str, Any] | MethodOptions | None = None
                       ) -> tuple[torch.Tensor, bool]:
        """How this method scores truncation: (squared weighted singular values, descending; whether in loss units)."""
        return self.spectrum(weight.detach(), stats, self.resolve_options(options))


METHODS: Registry[Method] = Registry("method", "--method", package="lmshrink.methods")


def register_method(
    name: str,
    *,
    kind: str = "lowrank",
    summary: str = "",
    needs: tuple[str, ...] = (),
    options: type[MethodOptions] = MethodOptions,
    target_kinds: tuple[str, ...] = ("linear", "embedding"),
    error_spectrum: Callable[[torch.Tensor, dict, MethodOptions], tuple[torch.Tensor, bool]] = plain_spectrum,
    group_targets: Callable[[list], list] | None = None,
    needs_when: dict[str, Callable[[MethodOptions], bool]] | None = None,
) -> Callable[[Callable], Callable]:
    """Decorator that adds a method to METHODS under ``name``."""
    if kind not in ("lowrank", "module"):
        raise ValueError(f"kind must be 'lowrank' or 'module', got {kind!r}")
    if group_targets is not None and kind != "module":
        raise ValueError(f"method {name!r}: only a module method groups its targets")
    if not (isinstance(options, type) and issubclass(options, MethodOptions) and dataclasses.is_dataclass(options)):
        raise ValueError(f"options of method {name!r} must be a MethodOptions dataclass, got {options!r}")

    def decorate(function: Callable) -> Callable:
        METHODS.register(name, Method(
            name, function, kind, summary or (function.__doc__ or "").strip().split("\n")[0],
            frozenset(needs), options, frozenset(target_kinds), error_spectrum, group_targets,
            tuple((needs_when or {}).items()),
        ))
        return function

    return decorate


def get_method(name: str) -> Method:
    return METHODS.get(name)


def all_methods() -> dict[str, Method]:
    return dict(sorted(METHODS.items()))
