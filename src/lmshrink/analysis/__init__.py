"""Per-matrix diagnostics for ``lmshrink inspect``: spectra first; other analyses register in ANALYSES."""

from __future__ import annotations

from typing import Callable

from tqdm.auto import tqdm

from lmshrink.decompose.svd import effective_rank, energy_at_rank, rank_for_ratio, svd

# name -> function(target, singular_values) -> dict of extra columns
ANALYSES: dict[str, Callable] = {}
INSPECT_RATIOS = (0.9, 0.8, 0.6, 0.4)


def register_analysis(name: str):
    def decorate(function):
        ANALYSES[name] = function
        return function

    return decorate


def inspect_targets(targets, progress: bool = True) -> list[dict]:
    import importlib
    import pkgutil

    import lmshrink.analysis as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"lmshrink.analysis.{info.name}")
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
