"""Signs of life for long jobs: one line per stage on stderr, or a live spinner on a terminal.

Without a terminal (a log file, CI, a pipe) every stage prints one line when it starts, with the time since
the job started: ``lmshrink [  1:23] calibrating (32 windows of 512 tokens)``. On a terminal a stage that has
no progress bar of its own (fetching, loading, saving) shows a spinner with its elapsed time; a stage with its
own bar (perplexity, calibration: tqdm) prints a plain line and lets the bar run, so two live displays never
fight over the same lines. Every finished stage prints its duration on a terminal too.
"""

from __future__ import annotations

import contextlib
import sys
import time


class Stages:
    """Reports the stages of one job. ``enabled=False`` (e.g. ``--json``) prints nothing."""

    def __init__(self, enabled: bool = True, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.terminal = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()
        self.durations: dict[str, float] = {}

    @property
    def bars(self) -> bool:
        """Whether inner loops should draw their own progress bars (only on a terminal)."""
        return self.terminal

    def clock(self) -> str:
        seconds = int(time.perf_counter() - self.start)
        return f"{seconds // 60:3d}:{seconds % 60:02d}"

    def note(self, message: str) -> None:
        if self.enabled:
            print(f"lmshrink [{self.clock()}] {message}", file=self.stream, flush=True)

    @contextlib.contextmanager
    def stage(self, name: str, has_bar: bool = False):
        """One stage of the job. ``has_bar``: the stage draws its own tqdm bar on a terminal."""
        began = time.perf_counter()
        if not self.enabled:
            yield
        elif self.terminal and not has_bar:
            from rich.console import Console
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                          console=Console(file=self.stream), transient=True) as live:
                live.add_task(name, total=None)
                yield
        else:
            self.note(name)
            yield
        self.durations[name] = time.perf_counter() - began
        if self.terminal:
            print(f"  {name}: {self.durations[name]:.1f} s", file=self.stream, flush=True)
