"""Save and load compressed models: model.safetensors + lmshrink.json, written atomically, never pickled."""

from __future__ import annotations

import json
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
    """Write the model to ``directory``. Everything goes to a temporary sibling first, which then replaces
    ``directory`` atomically (lmshrink.outputs), so an interrupted save never leaves a directory that looks
    complete, nor loses the one it was replacing. Non-finite weights are refused: nothing is written."""
    from lmshrink.models import load_model
    from lmshrink.outputs import nonfinite_tensors, reserve

    loaded = load_model(loaded)
    bad = nonfinite_tensors(loaded.model)
    if bad:
        raise InvalidArgument("model", f"{len(bad)} tensors hold NaN or inf ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}); "
                              "nothing was saved", "a model with finite weights")
    with reserve(directory, overwrite=overwrite, inputs=[loaded.source]) as output, output.staging() as staging:
        manifest = manifest_of(loaded)
        manifest["base"] = loaded.family.save_base(loaded, staging)
        save_safetensors_model(loaded.model, str(staging / WEIGHTS))
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return output.target


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
