"""The sharded layout: Hugging Face sharded safetensors + index + lmshrink.json, in the weights' own dtype.

``save_sharded`` writes an in-memory (whole-model) result through ``ShardWriter``; the block-by-block engine
writes the same layout block by block. ``lmshrink.load`` reads it, as strictly as a single-file save. (``io.save``
still writes one model.safetensors; making this the one save format of both paths is open work.)
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from lmshrink.outputs import check_output, reserve
from lmshrink.safefiles import file_digest
from lmshrink.io import MANIFEST, manifest_of
from lmshrink.shards import ShardWriter

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


def write_manifest(loaded, directory: Path, dtype: torch.dtype, run: dict | None = None) -> dict:
    """Config, tokenizer and lmshrink.json of ``loaded`` (its weights are written separately, as shards); ``run``: how
    the run was executed (e.g. {"processes": N}), recorded as the manifest's "run"."""
    loaded.model.config.dtype = dtype_name(dtype)
    manifest = manifest_of(loaded)
    if run is not None:
        manifest["run"] = run
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
