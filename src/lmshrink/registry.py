"""One registry mechanism for everything lmshrink finds by name: methods, allocations, model families, layer
types, analyses.

A ``Registry`` maps a name to an entry. Entries register themselves with the ``register`` decorator when their
module is imported. Which modules hold entries is declared where the registry is made (``modules``: a list of
module names, or ``package``: every module of a package), and they are imported once, on the first lookup
(``get``, ``names``, iteration), never while another module is being imported. The registry's own module so
never imports the modules that register into it: plug-ins depend on the registry, not the other way round.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Mapping
from typing import Callable, Generic, Iterator, TypeVar

from lmshrink.errors import InvalidArgument

Entry = TypeVar("Entry")


class Registry(Generic[Entry]):
    """name -> entry, filled by ``register`` as the declared modules are imported (see the module docstring).

    ``what`` names the entries in messages ("method"); ``argument`` is the option a user names them with
    ("--method"); ``modules`` / ``package`` declare where entries live.
    """

    def __init__(self, what: str, argument: str, *, modules: tuple[str, ...] = (), package: str | None = None):
        self.what = what
        self.argument = argument
        self.modules = tuple(modules)
        self.package = package
        self._entries: dict[str, Entry] = {}
        self._discovered = False

    def register(self, name: str, entry: Entry | None = None) -> Callable[[Entry], Entry] | Entry:
        """``@registry.register(name)`` on a function or class, or ``registry.register(name, entry)``.

        A second entry under a name already taken is a programming error (two plug-ins would shadow each other).
        """
        def add(value: Entry) -> Entry:
            if not isinstance(name, str) or not name:
                raise ValueError(f"a {self.what} needs a non-empty name, got {name!r}")
            if name in self._entries and self._entries[name] is not value:
                raise ValueError(f"{self.what} {name!r} is registered twice")
            self._entries[name] = value
            return value

        return add if entry is None else add(entry)

    def discover(self) -> None:
        """Import the declared modules (once) so that every entry has registered."""
        if self._discovered:
            return
        self._discovered = True  # first: a declared module that looks an entry up while importing must not recurse
        names = list(self.modules)
        if self.package is not None:
            package = importlib.import_module(self.package)
            names += [f"{self.package}.{info.name}" for info in pkgutil.iter_modules(package.__path__)]
        try:
            for module in names:
                importlib.import_module(module)
        except BaseException:
            self._discovered = False  # a failed import is raised again on the next lookup, never read as "unknown name"
            raise

    def get(self, name: str) -> Entry:
        """The entry called ``name``; else InvalidArgument naming the known ones (close matches first)."""
        self.discover()
        if isinstance(name, str) and name in self._entries:
            return self._entries[name]
        known = sorted(self._entries)
        close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.6) if isinstance(name, str) else []
        allowed = ", ".join(known) or "none"
        if close:
            allowed = f"{allowed} (close: {', '.join(close)})"
        raise InvalidArgument(self.argument, f"unknown {self.what} {name!r}", allowed)

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        self.discover()
        return sorted(self._entries)

    def items(self) -> list[tuple[str, Entry]]:
        """(name, entry) in the order they registered (declared modules in order, then definition order)."""
        self.discover()
        return list(self._entries.items())

    def values(self) -> list[Entry]:
        return [entry for _, entry in self.items()]

    def __contains__(self, name: object) -> bool:
        self.discover()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self.discover()
        return len(self._entries)

    def __getitem__(self, name: str) -> Entry:
        return self.get(name)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}, {len(self._entries)} entries)"

    def mapping(self) -> "RegistryView[Entry]":
        """A read-only dict-like view (``view[name]`` raises KeyError, ``view.get(name)`` gives None) for code
        that predates the registry; it discovers on first use like the registry itself."""
        return RegistryView(self)


class RegistryView(Mapping, Generic[Entry]):
    """Read-only Mapping over a Registry (see Registry.mapping)."""

    def __init__(self, registry: Registry[Entry]):
        self._registry = registry

    def __getitem__(self, name: str) -> Entry:
        self._registry.discover()
        return self._registry._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter([name for name, _ in self._registry.items()])

    def __len__(self) -> int:
        return len(self._registry)

    def __repr__(self) -> str:
        return f"RegistryView({self._registry!r})"
