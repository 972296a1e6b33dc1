"""Model adapters. ``load_model`` turns a name, path or nn.Module into a LoadedModel of some family.

A *family* knows how to load a kind of model, list its compressible matrices, tokenize text for it,
run it, and save/rebuild its base (config + tokenizer) next to lmshrink's weights. Families register
in MODEL_FAMILIES (lmshrink.models.family); the first whose ``detect`` accepts a path loads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from lmshrink.errors import NotAModel
from lmshrink.models.builtin import BUILTINS, fetch_builtin
from lmshrink.models.family import MODEL_FAMILIES, LoadedModel, ModelFamily, register_family

# A dict-like view of the registry for callers that index it (``FAMILIES["hf"]``, ``FAMILIES.get(name)``).
FAMILIES = MODEL_FAMILIES.mapping()


def _import_families() -> None:
    """Every family registered (lmshrink.io calls this before reading a manifest's family)."""
    MODEL_FAMILIES.discover()


def load_model(spec: "str | Path | nn.Module | LoadedModel", tokenizer: Any = None, *, device=None, dtype=None) -> LoadedModel:
    """Load a built-in name, a saved lmshrink directory, a Hugging Face directory, a .gguf file, or wrap a module.

    ``device``: "auto" (CUDA when present), "cpu", "cuda" or "cuda:N"; None leaves it where it loads (the CPU).
    ``dtype``: "auto" (what the checkpoint declares: its config's dtype; a GGUF: bfloat16; a saved lmshrink directory:
    the dtype it was saved in), "float32", "bfloat16", "float16" or a torch dtype; None keeps the dtype it loads in
    (float32 for Hugging Face directories and GGUF files; a saved directory's own). Floating parameters are cast;
    computed buffers (rotary frequencies) stay float32 (lmshrink.devices.place).
    """
    from lmshrink.devices import place

    if isinstance(spec, LoadedModel):
        return place(spec, device, dtype)
    if isinstance(spec, nn.Module):
        return place(MODEL_FAMILIES.get("hf").wrap(spec, tokenizer), device, dtype)
    text = str(spec)
    if text in BUILTINS:
        path = fetch_builtin(text)
        loaded = load_model(path, device=device, dtype=dtype)
        loaded.source = text
        return loaded
    path = Path(text).expanduser()
    if not path.exists():
        raise NotAModel(f"MODEL: {text!r} is neither a path nor a built-in name; built-ins: {', '.join(BUILTINS)}; "
                        "or give a Hugging Face directory, a .gguf file or a saved lmshrink directory")
    # A saved lmshrink directory is asked first: a damaged one is refused there, never loaded as a dense model.
    for family in sorted(MODEL_FAMILIES.values(), key=lambda f: not f.detect_first):
        if family.detect(path):
            return place(family.load(path), device, dtype, source_path=path)
    raise NotAModel(f"MODEL: {text!r} is not a model: expected a Hugging Face directory (config.json + weights), "
                    "a .gguf file, or a saved lmshrink directory (lmshrink.json)")


__all__ = ["FAMILIES", "MODEL_FAMILIES", "LoadedModel", "ModelFamily", "load_model", "register_family"]
