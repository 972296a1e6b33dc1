"""Norm diagnostics per matrix (Winata et al. 2019): L1 norm, nuclear norm, spread of row L1 norms.

The paper relates these to how much a matrix tolerates low-rank compression. ``matrix_norms`` is pure math;
``model_norms`` lists them for every target of a model; ``correlate`` measures how they track the
perplexity change after compressing each matrix.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lmshrink.analysis import register_analysis

NORM_COLUMNS = ("l1", "nuclear", "row_l1_std", "frobenius")


def matrix_norms(weight: Tensor) -> dict[str, float]:
    """{"l1": sum |w|, "nuclear": sum of singular values, "row_l1_std": std of per-row L1 norms, "frobenius", and
    the same divided by the entry count ("l1_mean") so matrices of different shapes compare}."""
    matrix = weight.detach().to(torch.float64)
    if matrix.dim() != 2:
        matrix = matrix.reshape(matrix.shape[0], -1)
    rows = matrix.abs().sum(1)
    nuclear = float(torch.linalg.svdvals(matrix).sum())
    return {"l1": float(rows.sum()), "nuclear": nuclear, "row_l1_std": float(rows.std(unbiased=False)),
            "frobenius": float(torch.linalg.norm(matrix)), "l1_mean": float(rows.sum() / matrix.numel()),
            "nuclear_per_dim": nuclear / min(matrix.shape)}


def model_norms(loaded, groups: tuple[str, ...] | None = None) -> list[dict]:
    """One row per target matrix of ``loaded`` (optionally only some groups): name, group, shape and its norms."""
    rows = []
    for target in loaded.candidates():
        if groups is not None and target.group not in groups:
            continue
        row = {"name": target.name, "group": target.group, "shape": list(target.shape)}
        row.update(matrix_norms(target.weight()))
        rows.append(row)
    return rows


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    position = 0
    while position < len(order):
        end = position
        while end + 1 < len(order) and values[order[end + 1]] == values[order[position]]:
            end += 1
        for index in order[position:end + 1]:
            ranks[index] = (position + end) / 2  # ties share their average rank
        position = end + 1
    return ranks


def pearson(x: list[float], y: list[float]) -> float:
    """Pearson correlation; NaN when fewer than 3 points or either side is constant."""
    if len(x) != len(y) or len(x) < 3:
        return math.nan
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def spearman(x: list[float], y: list[float]) -> float:
    return pearson(_ranks(x), _ranks(y))


def correlate(norm_rows: list[dict], perplexity_change: dict[str, float], columns=NORM_COLUMNS) -> dict[str, dict]:
    """Correlation of each norm with the perplexity change of compressing that matrix alone.

    ``perplexity_change`` maps target names to (compressed - dense) perplexity. Returns
    {column: {"pearson", "spearman", "points"}} over the matrices present in both.
    """
    shared = [row for row in norm_rows if row["name"] in perplexity_change]
    deltas = [perplexity_change[row["name"]] for row in shared]
    return {column: {"pearson": pearson([row[column] for row in shared], deltas),
                     "spearman": spearman([row[column] for row in shared], deltas), "points": len(shared)}
            for column in columns}


def format_norms(rows: list[dict]) -> str:
    """A plain-text table for ``lmshrink inspect``."""
    header = f"{'matrix':<16} {'group':<9} {'shape':>11} {'L1':>11} {'nuclear':>10} {'std(row L1)':>12}"
    lines = [header]
    for row in rows:
        shape = "x".join(map(str, row["shape"]))
        lines.append(f"{row['name']:<16} {row['group']:<9} {shape:>11} {row['l1']:>11.1f} {row['nuclear']:>10.2f} {row['row_l1_std']:>12.3f}")
    return "\n".join(lines)


@register_analysis("norms")
def norms_columns(target, singular_values) -> dict:
    """Shown by `lmshrink inspect` for every matrix (the singular values are already computed there)."""
    rows = target.weight().detach().to(torch.float64).abs().sum(1)
    return {"l1": float(rows.sum()), "nuclear": float(singular_values.double().sum()),
            "row_l1_std": float(rows.std(unbiased=False))}
