"""Save and load compressed models: model.safetensors + lmshrink.json, written atomically, never pickled."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model

from lmshrink.errors import CorruptFile, InvalidArgument
from lmshrink.layers import layer_type
from lmshrink.layers.base import FactorizedModule

FORMAT_VERSION = 1
MANIFEST = "lmshrink.json"
WEIGHTS = "model.safetensors"


def _version() -> str:
    from lmshrink import __version__

    return __version__


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("+")[0].split(".") if part.isdigit())


def manifest_of(loaded) -> dict:
    model = loaded.model
    modules = {name: {"layer": type(m).__name__, "config": m.layer_config()}
               for name, m in model.named_modules() if isinstance(m, FactorizedModule)}
    return {"format": "lmshrink", "format_version": FORMAT_VERSION, "lmshrink_version": _version(),
            "family": loaded.family.name, "source": loaded.source, "modules": modules,
            "compression": loaded.compression}


def save(loaded, directory: str | Path, overwrite: bool = False) -> Path:
    """Write the model to ``directory``. Everything goes to a temporary sibling first and is renamed at the end,
    so an interrupted save never leaves a directory that looks complete."""
    from lmshrink.models import load_model

    loaded = load_model(loaded)
    target = Path(directory).expanduser().resolve()
    if target.exists():
        if not overwrite and any(target.iterdir()):
            raise InvalidArgument("--out", f"{str(target)!r} exists and is not empty", "a new or empty directory, or overwrite=True (--overwrite)")
        if overwrite and any(target.iterdir()) and not (target / MANIFEST).is_file():
            raise InvalidArgument("--out", f"{str(target)!r} is not an lmshrink directory; refusing to overwrite it",
                                  "a new or empty directory, or a directory lmshrink saved before")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        manifest = manifest_of(loaded)
        manifest["base"] = loaded.family.save_base(loaded, staging)
        save_safetensors_model(loaded.model, str(staging / WEIGHTS))
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if target.exists():
            trash = target.with_name(f".{target.name}.old")
            os.replace(target, trash)
            os.replace(staging, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CorruptFile(f"MODEL: {str(path)!r} is not a readable lmshrink manifest: {error}") from error
    if manifest.get("format") != "lmshrink":
        raise CorruptFile(f"MODEL: {str(path)!r} is not an lmshrink manifest (no 'format': 'lmshrink')")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CorruptFile(f"MODEL: {str(path)!r} was written by lmshrink {manifest.get('lmshrink_version', '?')} "
                          f"(format {version}); this lmshrink {_version()} reads format <= {FORMAT_VERSION}: upgrade lmshrink")
    return manifest


def load(directory: str | Path):
    """Rebuild a saved model without the original weights: base model from config, factorized layers from the
    manifest, then every tensor from model.safetensors (strict: nothing missing, nothing extra)."""
    from lmshrink.models import FAMILIES, LoadedModel, _import_families

    directory = Path(directory).expanduser()
    manifest = read_manifest(directory)
    _import_families()
    family = FAMILIES.get(manifest.get("family"))
    if family is None:
        raise CorruptFile(f"MODEL: manifest names model family {manifest.get('family')!r}; known: {', '.join(FAMILIES)}")
    loaded: LoadedModel = family.build_empty(directory, manifest["base"])
    from lmshrink.surgery import replace_module

    for name, spec in manifest["modules"].items():
        layer = layer_type(spec["layer"]).from_config(spec["config"], loaded.model)
        replace_module(loaded.model, name, layer)
    weights = directory / WEIGHTS
    try:
        missing, unexpected = load_safetensors_model(loaded.model, str(weights), strict=False)
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise CorruptFile(f"MODEL: {str(weights)!r} is truncated or corrupted ({str(error).splitlines()[0]})") from error
    if missing or unexpected:
        raise CorruptFile(f"MODEL: {str(weights)!r} does not match its manifest: missing {missing[:5]}, unexpected {unexpected[:5]}")
    loaded.model.eval()
    loaded.manifest, loaded.source = manifest, str(directory)
    loaded.compression = manifest.get("compression", [])
    return loaded
