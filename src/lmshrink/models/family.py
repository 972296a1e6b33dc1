"""What a model family is (ModelFamily), a model with its family around it (LoadedModel), and the registry of
families (MODEL_FAMILIES). The families themselves live in their own modules (hf, lstm, saved), declared below;
they import this module, never the other way round.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from lmshrink.plan import COMMON_TARGET_GROUPS, Candidates
from lmshrink.registry import Registry

# The modules whose families register on import, in detection order (load_model asks each family's ``detect``).
MODEL_FAMILIES: Registry["ModelFamily"] = Registry(
    "model family", "MODEL", modules=("lmshrink.models.saved", "lmshrink.models.hf", "lmshrink.models.lstm.family"))


class ModelFamily:
    """Interface of a model family; an instance registers in MODEL_FAMILIES under ``name`` (register_family)."""

    name: str = ""
    causal: bool = True  # whether perplexity applies (encoders use fidelity instead)
    # The group aliases --targets accepts for this family's models (alias -> Target.group values).
    target_groups: dict[str, tuple[str, ...]] = COMMON_TARGET_GROUPS
    detect_first: bool = False  # asked before the others (a saved lmshrink directory also looks like a HF one)

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


@dataclass
class LoadedModel:
    """A model with what lmshrink needs around it: its family, tokenizer and where it came from."""

    model: nn.Module
    family: ModelFamily
    tokenizer: Any = None
    source: str = "<in-memory>"
    manifest: dict | None = None  # set when loaded from an lmshrink directory
    compression: list[dict] = field(default_factory=list)  # per-module report of the last compress()
    recipe: dict | None = None  # a recipe's record (lmshrink.recipes.record_recipe), kept through save and load

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

    def candidates(self) -> Candidates:
        """The family's targets, carrying its group aliases (so select_targets asks the model, not a global table)."""
        return Candidates(self.family.candidates(self), self.family.target_groups)



Family = TypeVar("Family", bound=ModelFamily)


def register_family(family: Family) -> Family:
    """Register a family (an instance: families hold no state) under its ``name``; returns it."""
    return MODEL_FAMILIES.register(family.name, family)
