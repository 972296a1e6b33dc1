"""Model adapters. ``load_model`` turns a name, path or nn.Module into a LoadedModel of some family.

A *family* knows how to load a kind of model, list its compressible matrices, tokenize text for it,
run it, and save/rebuild its base (config + tokenizer) next to lmshrink's weights. Families register
in FAMILIES; the first whose ``detect`` accepts a path loads it.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmshrink.errors import NotAModel


class ModelFamily:
    """Interface of a model family; subclasses register themselves by ``name``."""

    name: str = ""
    causal: bool = True  # whether perplexity applies (encoders use fidelity instead)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name:
            FAMILIES[cls.name] = cls()

    def detect(self, path: Path) -> bool:
        return False

    def load(self, path: Path) -> "LoadedModel":
        raise NotImplementedError

    def candidates(self, loaded: "LoadedModel") -> list:
        """Every module a plan may target, as lmshrink.plan.Target."""
        raise NotImplementedError

    def encode(self, loaded: "LoadedModel", text: str) -> list[int]:
        raise NotImplementedError

    def leading_token(self, loaded: "LoadedModel") -> int | None:
        """The token every sequence starts with in training (a BOS the tokenizer prepends by default), or None."""
        return None

    def logits(self, loaded: "LoadedModel", ids: torch.Tensor) -> torch.Tensor:
        """(batch, seq) token ids -> (batch, seq, vocab) next-token logits (causal families)."""
        raise NotImplementedError

    def embed(self, loaded: "LoadedModel", ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(batch, seq) ids -> (batch, dim) pooled embeddings (encoder families)."""
        raise NotImplementedError

    def untie_head(self, loaded: "LoadedModel") -> None:
        """Mark the model's config as having an output layer with its own weight (see Plan.untie_head)."""
        raise NotImplementedError(f"model family {self.name!r} cannot untie its output layer")

    def save_base(self, loaded: "LoadedModel", directory: Path) -> dict[str, Any]:
        """Write config and tokenizer; return JSON-safe facts that ``build_empty`` needs."""
        raise NotImplementedError

    def build_empty(self, directory: Path, base: dict[str, Any], stored: dict | None = None) -> "LoadedModel":
        """The dense base model on the meta device (nothing allocated), with its tokenizer.

        ``base`` comes from an untrusted manifest: validate it. ``stored`` (name -> lmshrink.safefiles.StoredTensor of
        the weights file) bounds counts that would only cost time (layers). The loader swaps in the factorized
        layers, checks every shape against the stored tensors, and only then calls ``materialize``.
        """
        raise NotImplementedError

    def materialize(self, loaded: "LoadedModel") -> None:
        """Allocate a checked meta skeleton on the CPU. Stored tensors are filled afterwards; a family whose models
        compute buffers at construction (not stored) recomputes them here."""
        loaded.model.to_empty(device="cpu")


FAMILIES: dict[str, ModelFamily] = {}


@dataclass
class LoadedModel:
    """A model with what lmshrink needs around it: its family, tokenizer and where it came from."""

    model: nn.Module
    family: ModelFamily
    tokenizer: Any = None
    source: str = "<in-memory>"
    manifest: dict | None = None  # set when loaded from an lmshrink directory
    compression: list[dict] = field(default_factory=list)  # per-module report of the last compress()

    @property
    def causal(self) -> bool:
        return self.family.causal

    def encode(self, text: str) -> list[int]:
        return self.family.encode(self, text)

    @property
    def leading_token(self) -> int | None:
        return self.family.leading_token(self)

    @property
    def device(self) -> torch.device:
        return next((p.device for p in self.model.parameters()), torch.device("cpu"))

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits on the model's device (``ids`` are moved there)."""
        return self.family.logits(self, ids.to(self.device))

    def embed(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        device = self.device
        return self.family.embed(self, ids.to(device), mask.to(device))

    def candidates(self) -> list:
        return self.family.candidates(self)


def _import_families() -> None:
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def load_model(spec: "str | Path | nn.Module | LoadedModel", tokenizer: Any = None, *, device=None, dtype=None) -> LoadedModel:
    """Load a built-in name, a saved lmshrink directory, a Hugging Face directory, a .gguf file, or wrap a module.

    ``device``: "auto" (CUDA when present), "cpu", "cuda" or "cuda:N"; None leaves it where it loads (the CPU).
    ``dtype``: "auto" (what the checkpoint declares: its config's dtype; a GGUF: bfloat16; a saved lmshrink directory:
    the dtype it was saved in), "float32", "bfloat16", "float16" or a torch dtype; None keeps the dtype it loads in
    (float32 for Hugging Face directories and GGUF files; a saved directory's own). Floating parameters are cast;
    computed buffers (rotary frequencies) stay float32 (lmshrink.devices.place).
    """
    from lmshrink.devices import place

    _import_families()
    if isinstance(spec, LoadedModel):
        return place(spec, device, dtype)
    if isinstance(spec, nn.Module):
        return place(FAMILIES["hf"].wrap(spec, tokenizer), device, dtype)
    from lmshrink.models.builtin import BUILTINS, fetch_builtin

    text = str(spec)
    if text in BUILTINS:
        path = fetch_builtin(text)
        loaded = load_model(path, device=device, dtype=dtype)
        loaded.source = text
        return loaded
    path = Path(text).expanduser()
    from lmshrink.io import load, looks_like_lmshrink

    if path.is_dir() and looks_like_lmshrink(path):
        return load(path, device=device, dtype=dtype)  # a damaged lmshrink directory is refused there, never loaded as a dense model
    if not path.exists():
        raise NotAModel(f"MODEL: {text!r} is neither a path nor a built-in name; built-ins: {', '.join(BUILTINS)}; "
                        "or give a Hugging Face directory, a .gguf file or a saved lmshrink directory")
    for family in FAMILIES.values():
        if family.detect(path):
            return place(family.load(path), device, dtype, source_path=path)
    raise NotAModel(f"MODEL: {text!r} is not a model: expected a Hugging Face directory (config.json + weights), "
                    "a .gguf file, or a saved lmshrink directory (lmshrink.json)")


def declares_causal(spec) -> bool | None:
    """Whether ``spec`` is a causal LM, from its config or manifest alone (no weights read): True, False, or None when
    that cannot be told without loading it (a module, a path of no known kind). Lets a command refuse what needs
    next-token logits (eval --tasks) before loading and measuring anything."""
    if isinstance(spec, LoadedModel):
        return spec.causal
    if isinstance(spec, nn.Module):
        return None
    from lmshrink.models.builtin import BUILTINS, fetch_builtin, is_cached

    text = str(spec)
    if text in BUILTINS:
        if not is_cached(text):
            return None  # told once fetched and loaded
        path = fetch_builtin(text)
    else:
        path = Path(text).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return True  # GGUF files hold causal LMs (lmshrink loads them with AutoModelForCausalLM)
    if not path.is_dir():
        return None
    from lmshrink.errors import LmshrinkError
    from lmshrink.io import MANIFEST, read_manifest

    try:
        if (path / MANIFEST).is_file():
            causal = read_manifest(path)["base"].get("causal")
            return causal if isinstance(causal, bool) else None
        if (path / "config.json").is_file():
            from lmshrink.models.hf import checked_config

            architectures = checked_config(path).get("architectures") or []
            if not isinstance(architectures, list) or not architectures:
                return None
            return any(isinstance(a, str) and a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    except LmshrinkError:
        return None  # a damaged directory: loading it says what is wrong
    return None
