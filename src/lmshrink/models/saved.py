"""Directories saved by lmshrink, as a family that only opens them: ``detect`` recognises the manifest, ``load`` is
lmshrink.io.load, which then rebuilds the model with the family its manifest names. Registering it here (not calling
io from load_model) keeps lmshrink.models free of lmshrink.io, which itself uses lmshrink.models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmshrink.errors import CorruptFile
from lmshrink.io import load, looks_like_lmshrink
from lmshrink.models.family import LoadedModel, ModelFamily, register_family


class SavedDirectory(ModelFamily):
    name = "lmshrink-directory"
    detect_first = True

    def detect(self, path: Path) -> bool:
        return path.is_dir() and looks_like_lmshrink(path)

    def load(self, path: Path) -> LoadedModel:
        return load(path)

    def build_empty(self, directory: Path, base: dict[str, Any], stored: dict | None = None) -> LoadedModel:
        # Only a hostile or damaged manifest names this family: it opens directories, it has no models of its own.
        raise CorruptFile(f"MODEL: manifest in {str(directory)!r} names model family {self.name!r}, which opens saved "
                          "directories and has no models of its own; allowed: the family the model was saved from")


SAVED_DIRECTORY = register_family(SavedDirectory())
