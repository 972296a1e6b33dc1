"""Where lmshrink keeps what it fetches and computes once (built-in models, calibration statistics, sampled
calibration text, reference LSTMs), and the two things every computed entry needs: a key from the weights it came
from, and a write that a concurrent reader never sees half done."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def cache_dir() -> Path:
    """LMSHRINK_CACHE, else $XDG_CACHE_HOME/lmshrink, else ~/.cache/lmshrink."""
    if os.environ.get("LMSHRINK_CACHE"):
        return Path(os.environ["LMSHRINK_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lmshrink"


def weights_fingerprint(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """A cheap fingerprint of named tensors (shape, sum, sum of squares, a few entries): keys cache entries by the
    weights themselves rather than a model's name, so a model changed in place never reuses a stale entry."""
    import torch

    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in named:
            w = tensor.detach().double()
            flat = w.reshape(-1)
            probe = flat[:: max(1, flat.numel() // 64)][:64]
            digest.update(f"{name}:{tuple(w.shape)}:{float(w.sum()):.12e}:{float((w * w).sum()):.12e}".encode())
            digest.update(probe.float().cpu().numpy().tobytes())
    return digest.hexdigest()


def write_safetensors(path: Path, tensors: dict, metadata: dict[str, str]) -> None:
    """Save ``tensors`` to ``path`` through a temporary file in the same folder, moved into place at the end."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, str(temporary), metadata=metadata)
    os.replace(temporary, path)  # atomic: a concurrent reader never sees half a file
