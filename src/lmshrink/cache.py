"""Where lmshrink keeps what it fetches and computes once (built-in models, calibration statistics, reference LSTMs)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """LMSHRINK_CACHE, else $XDG_CACHE_HOME/lmshrink, else ~/.cache/lmshrink."""
    if os.environ.get("LMSHRINK_CACHE"):
        return Path(os.environ["LMSHRINK_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lmshrink"
