"""Per-matrix diagnostics for ``lmshrink inspect``: spectra first; other analyses register in ANALYSES (every module
of this package may hold some)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from lmshrink.accounting import module_params
from lmshrink.decompose.svd import effective_rank, energy_at_rank, rank_for_ratio, svd
from lmshrink.plan import Target, select_targets
from lmshrink.registry import Registry

# name -> function(target, singular_values) -> dict of extra columns
ANALYSES: Registry[Callable] = Registry("analysis", "analysis", package="lmshrink.analysis")
INSPECT_RATIOS = (0.9, 0.8, 0.6, 0.4)


def register_analysis(name: str):
    return ANALYSES.register(name)


def inspect_targets(targets, progress: bool = True) -> list[dict]:
    rows = []
    for target in tqdm(targets, desc="inspect", unit="matrix", disable=not progress):
        weight = target.weight().detach()
        singular_values = svd(weight)[1]
        m, n = weight.shape
        row = {"name": target.name, "kind": target.kind, "shape": [m, n], "params": m * n,
               "effective_rank": effective_rank(singular_values)}
        for ratio in INSPECT_RATIOS:
            row[f"energy@{ratio:g}"] = energy_at_rank(singular_values, rank_for_ratio((m, n), ratio))
        for analysis in ANALYSES.values():
            row.update(analysis(target, singular_values))
        rows.append(row)
    return rows


def inspect_model(loaded, patterns, progress: bool = True) -> list[dict]:
    """One row per target that ``patterns`` select, whether it is still dense or was factorized by lmshrink.

    Dense rows carry the spectrum columns of ``inspect_targets``; factorized rows (a directory lmshrink saved)
    carry the layer that replaced the matrix and its rank (or ranks), with its parameters now. Every row has
    ``layer`` ("dense" or the factorized layer's class) and ``rank`` (None for dense matrices).
    """
    factorized = (loaded.manifest or {}).get("modules", {})
    if not factorized:
        rows = inspect_targets(select_targets(loaded.candidates(), patterns), progress)
        return [{**row, "layer": "dense", "rank": None} for row in rows]
    # Targets are selected on the dense base the directory was made from (its structure only, on the meta
    # device: no memory, no initialisation), so group names such as 'linears' still mean what they meant.
    import torch

    with torch.device("meta"):
        base = loaded.family.build_empty(Path(loaded.source), loaded.manifest["base"])
    reported = {row["name"]: row for row in loaded.compression or []}
    chosen = select_targets(base.candidates(), patterns)
    dense = [Target(t.name, loaded.model.get_submodule(t.name), t.kind, t.group, t.tied_head) for t in chosen if t.name not in factorized]
    spectra = {row["name"]: row for row in inspect_targets(dense, progress)}
    rows = []
    for target in chosen:
        if target.name in spectra:
            rows.append({**spectra[target.name], "layer": "dense", "rank": None})
            continue
        spec = factorized[target.name]
        config = spec.get("config", {})
        rank = reported.get(target.name, {}).get("rank") or config.get("rank") or config.get("ranks")
        m, n = target.shape
        rows.append({"name": target.name, "kind": target.kind, "shape": [m, n], "layer": spec["layer"], "rank": rank,
                     "params": module_params(loaded.model.get_submodule(target.name)), "dense_params": m * n})
    return rows
