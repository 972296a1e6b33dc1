"""Sharded save/load: Hugging Face sharded safetensors + index + lmshrink.json, one format for both compress paths.

``save_sharded`` writes an in-memory (whole-model) result module by module through ``ShardWriter``;
the block-by-block engine writes the same layout block by block. ``load_sharded`` builds the model on the
meta device from config + manifest and fills it tensor by tensor (never a second copy of the weights).
To be merged into lmshrink.io (save/load) by the lead.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from lmshrink.errors import CorruptFile
from lmshrink.outputs import check_output, reserve
from lmshrink.safefiles import file_digest
from lmshrink.io import MANIFEST, manifest_of, read_manifest
from lmshrink.shards import ShardWriter, SafetensorsSource, fill, materialize

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_out(directory: str | Path, overwrite: bool = False) -> Path:
    """``directory`` checked as an output before any work (lmshrink.outputs.check_output)."""
    return check_output(directory, overwrite=overwrite)


@contextlib.contextmanager
def staging_directory(directory: str | Path, overwrite: bool = False):
    """A temporary sibling of ``directory`` to write into, swapped into place atomically when the block ends without
    error; the output is locked meanwhile (lmshrink.outputs)."""
    with reserve(directory, overwrite=overwrite) as output, output.staging() as staging:
        yield staging


def write_manifest(loaded, directory: Path, dtype: torch.dtype) -> dict:
    """Config, tokenizer and lmshrink.json of ``loaded`` (its weights are written separately, as shards)."""
    loaded.model.config.dtype = dtype_name(dtype)
    manifest = manifest_of(loaded)
    manifest["base"] = loaded.family.save_base(loaded, directory)
    manifest["weights"] = {"layout": "sharded-safetensors", "dtype": dtype_name(dtype)}
    # Digests of every weights file, verified by lmshrink.load (the shards and their index are written by now).
    manifest["files"] = {path.name: file_digest(path) for path in sorted(directory.glob("model*.safetensors*"))}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def save_sharded(loaded, directory: str | Path, dtype: torch.dtype | None = None, overwrite: bool = False,
                 max_shard_bytes: int = 2 << 30) -> Path:
    """Write an in-memory model in the sharded layout, in ``dtype`` (default: the model's own)."""
    from lmshrink.models import load_model

    loaded = load_model(loaded)
    dtype = dtype or next(p.dtype for p in loaded.model.parameters() if p.is_floating_point())
    with staging_directory(directory, overwrite) as staging:
        writer = ShardWriter(staging, dtype, max_shard_bytes)
        writer.add(loaded.model.state_dict())
        writer.close()
        write_manifest(loaded, staging, dtype)
    return Path(directory).expanduser().resolve()


def load_sharded(directory: str | Path, dtype: torch.dtype | None = None, device="cpu"):
    """Rebuild a sharded lmshrink save: skeleton on the meta device, factorized layers from the manifest, then every
    tensor from the shards (strict: nothing missing, nothing extra). ``dtype`` defaults to the saved one."""
    from transformers import AutoConfig, AutoTokenizer

    from lmshrink.layers import layer_type
    from lmshrink.models import FAMILIES, LoadedModel, _import_families
    from lmshrink.models.blocks import build_skeleton
    from lmshrink.surgery import replace_module

    directory = Path(directory).expanduser()
    manifest = read_manifest(directory)
    _import_families()
    family = FAMILIES.get(manifest.get("family"))
    if family is None or not manifest.get("base", {}).get("causal"):
        raise CorruptFile(f"MODEL: {str(directory)!r}: sharded loading handles Hugging Face causal LMs; the manifest names "
                          f"family {manifest.get('family')!r}")
    saved = manifest.get("weights", {}).get("dtype", "float32")
    dtype = dtype or DTYPES.get(saved, torch.float32)
    source = SafetensorsSource(directory)
    config = AutoConfig.from_pretrained(directory)
    model = build_skeleton(config, dtype)
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        for name, spec in manifest["modules"].items():
            layer = layer_type(spec["layer"]).from_config(spec["config"], model).to(dtype)
            replace_module(model, name, layer)
    materialize(model, device)
    fill(model, source)
    tokenizer = AutoTokenizer.from_pretrained(directory) if manifest["base"].get("tokenizer") else None
    loaded = LoadedModel(model, family, tokenizer, str(directory))
    loaded.manifest, loaded.compression = manifest, manifest.get("compression", [])
    return loaded
