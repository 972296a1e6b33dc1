"""Errors lmshrink raises for bad input: one line each, naming the argument, the problem and what is allowed."""


class LmshrinkError(Exception):
    """Base class of every error lmshrink raises on purpose (the CLI prints it as one line, exit 2)."""


class InvalidArgument(LmshrinkError, ValueError):
    """An argument outside what is allowed."""

    def __init__(self, argument: str, problem: str, allowed: str):
        self.argument, self.problem, self.allowed = argument, problem, allowed
        super().__init__(f"{argument}: {problem}; allowed: {allowed}")


class NotAModel(LmshrinkError):
    """A path or name that no model family can load."""


class DataError(LmshrinkError):
    """Text or token data that cannot serve the request (too short, empty, wrong vocabulary)."""


class CorruptFile(LmshrinkError):
    """A saved file that is truncated, corrupted, or from a newer lmshrink."""


class OutOfMemory(LmshrinkError, MemoryError):
    """A model or step that does not fit in the memory this process may use."""


class DistributedError(LmshrinkError):
    """A distributed run (torchrun) that cannot go on: a process died or timed out, or the processes disagree."""
