"""SVD-risk: predicts, before any evaluation, when plain truncated SVD will cost a large loss increase.

For a matrix W with diagonal Fisher information I and its rank-k truncated SVD W_k, the risk is the
second-order estimate of the loss increase that truncation causes,

    risk(W, k) = 1/2 sum_ij I_ij (W - W_k)_ij^2      (nats of mean token loss),

and the model's risk is the sum over the targeted matrices. It is large when the truncated directions carry
weights the loss is sensitive to, which is exactly the case Hua et al. (EMNLP 2022) single out as where SVD
fails and importance weighting rescues it. ``fisher_gap`` adds the complementary diagnostic: the fraction of
that risk an importance-aware factorization (FWSVD) removes at the same rank.

Note: the exact formula of the TFWSVD paper's metric could not be retrieved while writing this; this module
implements the Fisher-based predictor above and validates it by rank correlation against measured increases
(benchmarks/importance.py).
"""

from __future__ import annotations

import math

import torch

from lmshrink.decompose.svd import check_rank, rank_for_ratio
from lmshrink.decompose.weighted import row_weighted_svd, weighted_error
from lmshrink.errors import InvalidArgument


def svd_risk(weight: torch.Tensor, fisher: torch.Tensor, rank: int, with_fwsvd: bool = False) -> dict:
    """{"risk": 1/2 sum I (W - W_k)^2, "relative": risk / (1/2 sum I W^2), and with_fwsvd: "fwsvd_risk", "fisher_gap"}."""
    if fisher.shape != weight.shape:
        raise InvalidArgument("fisher", f"has shape {tuple(fisher.shape)}", f"the weight's shape {tuple(weight.shape)}")
    check_rank(rank, tuple(weight.shape))
    work = weight.detach().double()
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    residual = (u[:, rank:] * s[rank:]) @ vh[rank:]
    importance = fisher.double().to(work.device)
    risk = 0.5 * float((importance * residual * residual).sum())
    total = 0.5 * float((importance * work * work).sum())
    result = {"risk": risk, "relative": risk / total if total > 0 else 0.0}
    if with_fwsvd:
        left, right = row_weighted_svd(work, rank, importance.sum(1))
        fw = 0.5 * weighted_error(work, left @ right, importance)
        result["fwsvd_risk"] = fw
        result["fisher_gap"] = 1 - fw / risk if risk > 0 else 0.0
    return result


def model_svd_risk(targets, stats: dict, ratio: float) -> dict:
    """Per-matrix and total SVD-risk at a uniform ``ratio``: {"total": nats, "matrices": [{name, rank, risk, ...}]}."""
    rows = []
    for target in targets:
        entry = stats.get(target.name, {})
        if "fisher" not in entry:
            raise InvalidArgument("stats", f"{target.name} has no Fisher information", "stats from collect_stats(..., needs={'fisher'})")
        shape = tuple(target.shape)
        rank = rank_for_ratio(shape, ratio)
        if rank * (shape[0] + shape[1]) >= shape[0] * shape[1]:
            continue  # stays dense at this ratio: no risk
        rows.append({"name": target.name, "rank": rank, **svd_risk(target.weight().detach(), entry["fisher"], rank, with_fwsvd=True)})
    return {"ratio": ratio, "total": sum(r["risk"] for r in rows), "matrices": rows}


def rank_correlation(x, y) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN when either side is constant."""
    a = torch.as_tensor(list(x), dtype=torch.float64)
    b = torch.as_tensor(list(y), dtype=torch.float64)
    if a.numel() != b.numel() or a.numel() < 2:
        raise InvalidArgument("x, y", f"have {a.numel()} and {b.numel()} values", "two sequences of equal length >= 2")
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denominator if denominator > 0 else math.nan


def _ranks(values: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(values, stable=True)
    ranks = torch.empty_like(values)
    ranks[order] = torch.arange(len(values), dtype=values.dtype)
    # Ties share their average rank.
    for value in torch.unique(values):
        mask = values == value
        if mask.sum() > 1:
            ranks[mask] = ranks[mask].mean()
    return ranks


INSPECT_RISK_RATIO = 0.8


def add_risk_columns(loaded, targets, rows: list[dict], corpus, windows: int = 16, window_len: int = 512,
                     ratio: float = INSPECT_RISK_RATIO, progress: bool = True) -> dict:
    """For ``lmshrink inspect --data``: Fisher on the calibration text, then per matrix the SVD-risk at ``ratio``
    (``svd_risk@R``, nats) and the share of it FWSVD removes (``fisher_gap@R``). Returns the model-level summary.
    Embeddings get the same treatment (their Fisher comes from the rows of the tokens seen)."""
    from lmshrink.calibration import collect_stats

    stats = collect_stats(loaded, targets, corpus, {"fisher"}, windows=windows, window_len=window_len, progress=progress)
    summary = model_svd_risk(targets, stats, ratio)
    by_name = {r["name"]: r for r in summary["matrices"]}
    for row in rows:
        entry = by_name.get(row["name"])
        row[f"svd_risk@{ratio:g}"] = entry["risk"] if entry else 0.0
        row[f"fisher_gap@{ratio:g}"] = entry["fisher_gap"] if entry else 0.0
    return {"ratio": ratio, "total_svd_risk": summary["total"], "windows": windows, "window": window_len,
            "data": corpus.source}
