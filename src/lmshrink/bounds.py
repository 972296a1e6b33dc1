"""The allowed range of a numeric option, checked in one place for method options and the CLI's own options."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmshrink.errors import InvalidArgument


def _show(number: float) -> str:
    return f"{number:,}" if isinstance(number, int) and abs(number) >= 10_000 else f"{number:g}"


@dataclass(frozen=True)
class Bounds:
    """``low`` <= value <= ``high`` (either end optional; ``low_open``/``high_open`` exclude the end itself).

    Floats must also be finite: NaN and inf are never an option's value.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def describe(self, kind: type) -> str:
        what = "an integer" if kind is int else "a finite number"
        ends = []
        if self.low is not None:
            ends.append(f"{'>' if self.low_open else '>='} {_show(self.low)}")
        if self.high is not None:
            ends.append(f"{'<' if self.high_open else '<='} {_show(self.high)}")
        return f"{what} {' and '.join(ends)}" if ends else what

    def check(self, argument: str, value, kind: type):
        """``value`` as ``kind`` (int or float) if it is one and lies inside; else InvalidArgument naming ``argument``."""
        allowed = self.describe(kind)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
            raise InvalidArgument(argument, f"{value!r} is not {'an integer' if kind is int else 'a number'}", allowed)
        if kind is float:
            value = float(value)
            if not math.isfinite(value):
                raise InvalidArgument(argument, f"{value} is not a finite number", allowed)
        too_low = self.low is not None and (value < self.low or (self.low_open and value == self.low))
        too_high = self.high is not None and (value > self.high or (self.high_open and value == self.high))
        if too_low or too_high:
            if self.low is not None and self.high is not None:
                interval = f"{'(' if self.low_open else '['}{_show(self.low)}, {_show(self.high)}{')' if self.high_open else ']'}"
                problem = f"{_show(value)} is outside {interval}"
            elif too_low:
                problem = f"{_show(value)} is {'not above' if self.low_open else 'below'} {_show(self.low)}"
            else:
                problem = f"{_show(value)} is {'not below' if self.high_open else 'above'} {_show(self.high)}"
            raise InvalidArgument(argument, problem, allowed)
        return value


def check_number(argument: str, value, kind: type, bounds: Bounds | None = None):
    """``value`` checked against ``bounds`` (default: any finite number or any integer); see Bounds.check."""
    return (bounds or Bounds()).check(argument, value, kind)
