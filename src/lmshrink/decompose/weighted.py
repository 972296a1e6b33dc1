"""Importance-weighted low-rank approximation: plain tensor math, no modules.

Every closed-form method here solves the same problem

    min_{rank(W') <= k} || R (W - W') C ||_F^2

with R = diag(sqrt(row weights)) (out x out) and C a square root of an input second-moment matrix
(in x in; C C^T = A). With U_k the top-k left singular vectors of R W C the minimizer is

    W' = R^-1 U_k U_k^T R W.

The projection form never inverts C, so a singular or indefinite input Gram cannot break it, and only
R (a diagonal of clamped positive weights) is ever inverted. Special cases:

- plain SVD: R = I, C = I;
- FWSVD (Hsu et al. 2022): R from row sums of the Fisher information, C = I;
- ASVD (Yuan et al. 2023): R = I, C = diag(mean |x_j| ** alpha);
- SVD-LLM (Wang et al. 2024) truncation-aware whitening: R = I, C C^T = X X^T (input Gram);
- Fisher-whitened ("fwhiten"): R from the output-gradient scale implied by the Fisher, C from the
  Gram. This is the Kronecker (K-FAC-like) second-order model of the loss change,
  dL ~ 1/2 tr(dW^T G dW A), in the same closed form, with G restricted to a diagonal.
- KFAC ("kfac", ``kronecker_lowrank``): the same model with G the full output-gradient second moment
  E[g g^T]. In G's eigenbasis G = Q diag(l) Q^T the problem is the row-weighted one for Q^T W with row
  weights l (zeros lifted like ``safe_weights``), so it reuses ``two_sided_lowrank`` and rotates back.

TFWSVD (Hua et al. 2022) has no closed form: the element-wise objective sum_ij I_ij (W - L R)_ij^2 is
minimized numerically from the FWSVD start (``elementwise_weighted_lowrank``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lmshrink.decompose.svd import check_rank
from lmshrink.errors import InvalidArgument


def _check_matrix(weight: Tensor, argument: str = "weight") -> None:
    if weight.dim() != 2:
        raise InvalidArgument(argument, f"has {weight.dim()} dimensions", "a 2-D (out, in) matrix")
    if not torch.isfinite(weight).all():
        raise InvalidArgument(argument, "contains NaN or inf", "finite values")


def _check_vector(values: Tensor, length: int, argument: str) -> Tensor:
    values = torch.as_tensor(values)
    if values.dim() != 1 or values.numel() != length:
        raise InvalidArgument(argument, f"has shape {tuple(values.shape)}", f"a vector of length {length}")
    if not torch.isfinite(values).all() or (values < 0).any():
        raise InvalidArgument(argument, "has negative, NaN or inf entries", "finite non-negative weights")
    return values


def safe_weights(weights: Tensor, floor: float = 1e-6) -> Tensor:
    """Non-negative weights with zeros lifted to ``floor`` x their mean, so that 1/w stays finite.

    A row that got no importance at all (an unused output) must still be approximated somehow; the
    floor keeps it in the problem with negligible weight instead of dividing by zero.
    """
    weights = weights.double()
    mean = weights.mean()
    if mean <= 0:
        return torch.ones_like(weights)
    return weights.clamp_min(floor * mean)


def psd_sqrt(gram: Tensor, damping: float = 0.0) -> tuple[Tensor, str]:
    """A square root C with C C^T ~ gram for a symmetric input Gram matrix, and how it was found.

    Cholesky first (what SVD-LLM uses); when it fails (singular or indefinite from round-off or few
    tokens) an eigendecomposition with negative eigenvalues clamped to zero. ``damping`` adds that
    fraction of the mean diagonal first. Returns (C (n, n) float64, "cholesky" | "eigh").
    """
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise InvalidArgument("input_gram", f"has shape {tuple(gram.shape)}", "a square (in, in) matrix")
    if not torch.isfinite(gram).all():
        raise InvalidArgument("input_gram", "contains NaN or inf", "a finite symmetric matrix")
    gram = gram.double()
    gram = (gram + gram.T) / 2
    if damping > 0:
        gram = gram + damping * gram.diagonal().mean().clamp_min(0) * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    root, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0 and torch.isfinite(root).all():
        return root, "cholesky"
    values, vectors = torch.linalg.eigh(gram)
    return vectors * values.clamp_min(0).sqrt(), "eigh"


def _balanced(left_basis: Tensor, right: Tensor) -> tuple[Tensor, Tensor]:
    # Re-split left_basis @ right so that its singular values are shared as square roots (the design's
    # balanced convention): QR of the tall factor, then the SVD of a small k x n matrix.
    q, r = torch.linalg.qr(left_basis)
    u, s, vh = torch.linalg.svd(r @ right, full_matrices=False)
    root = s.sqrt()
    return (q @ u) * root, root[:, None] * vh


def weighted_spectrum(weight: Tensor, row_weights: Tensor | None = None, input_sqrt: Tensor | None = None) -> Tensor:
    """Singular values of R W C: their squared tail beyond k is the weighted error of the best rank-k fit."""
    return torch.linalg.svdvals(_transform(weight, row_weights, input_sqrt))


def _transform(weight: Tensor, row_weights: Tensor | None, input_sqrt: Tensor | None) -> Tensor:
    work = weight.double()
    if row_weights is not None:
        work = work * row_weights.double().to(work.device).sqrt()[:, None]
    if input_sqrt is not None:
        work = work @ input_sqrt.double().to(work.device)
    return work


def two_sided_lowrank(
    weight: Tensor, rank: int, row_weights: Tensor | None = None, input_sqrt: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Best rank-k (left, right) for || R (W - left right) C ||_F with R = diag(sqrt(row_weights)).

    ``row_weights`` (out,) must be positive (see ``safe_weights``); ``input_sqrt`` (in, in) is any C,
    possibly singular. Computed in float64, returned in float32 (float64 stays float64).
    """
    _check_matrix(weight)
    check_rank(rank, tuple(weight.shape))
    out_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    if row_weights is not None:
        row_weights = _check_vector(row_weights, weight.shape[0], "row_weights").double().to(weight.device)
        if (row_weights <= 0).any():
            raise InvalidArgument("row_weights", "has zero entries", "positive weights (lift zeros with safe_weights)")
    if input_sqrt is not None and tuple(input_sqrt.shape) != (weight.shape[1], weight.shape[1]):
        raise InvalidArgument("input_sqrt", f"has shape {tuple(input_sqrt.shape)}", f"({weight.shape[1]}, {weight.shape[1]})")
    work = _transform(weight, row_weights, input_sqrt)
    u = torch.linalg.svd(work, full_matrices=False)[0][:, :rank]
    scaled_weight = weight.double() if row_weights is None else weight.double() * row_weights.sqrt()[:, None]
    right = u.T @ scaled_weight  # U_k^T R W: no inverse of C anywhere
    left_basis = u if row_weights is None else u / row_weights.sqrt()[:, None]
    left, right = _balanced(left_basis, right)
    return left.to(out_dtype), right.to(out_dtype)


def output_eigenbasis(output_gram: Tensor, damping: float = 0.0, floor: float = 1e-6) -> tuple[Tensor, Tensor]:
    """(Q (out, out), weights (out,)) with G ~ Q diag(weights) Q^T for a symmetric PSD output-side matrix G.

    ``damping`` adds that fraction of G's mean diagonal first (Tikhonov, as ``psd_sqrt`` does for the input side);
    eigenvalues are then clamped at zero and lifted to ``floor`` x their mean (``safe_weights``), so directions the
    loss never saw stay in the problem with negligible weight and the back-rotation needs no pseudo-inverse.
    """
    if output_gram.dim() != 2 or output_gram.shape[0] != output_gram.shape[1]:
        raise InvalidArgument("output_gram", f"has shape {tuple(output_gram.shape)}", "a square (out, out) matrix")
    if not torch.isfinite(output_gram).all():
        raise InvalidArgument("output_gram", "contains NaN or inf", "a finite symmetric PSD matrix")
    if damping < 0 or not math.isfinite(damping):
        raise InvalidArgument("damping", f"{damping} is not a finite non-negative number", "damping >= 0")
    gram = output_gram.double()
    gram = (gram + gram.T) / 2
    if damping > 0:
        gram = gram + damping * gram.diagonal().mean().clamp_min(0) * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    values, vectors = torch.linalg.eigh(gram)
    return vectors, safe_weights(values.clamp_min(0), floor)


def _check_output_side(weight: Tensor, output_gram: Tensor) -> None:
    if tuple(output_gram.shape) != (weight.shape[0], weight.shape[0]):
        raise InvalidArgument("output_gram", f"has shape {tuple(output_gram.shape)}", f"({weight.shape[0]}, {weight.shape[0]})")


def kronecker_lowrank(weight: Tensor, rank: int, output_gram: Tensor, input_sqrt: Tensor | None = None,
                      damping: float = 0.0) -> tuple[Tensor, Tensor]:
    """Best rank-k (left, right) for tr((W - W')^T G (W - W') A), G = ``output_gram`` (out, out) PSD, A = C C^T.

    The SVD of G^1/2 W C in G's eigenbasis (``output_eigenbasis``): the row-weighted problem for Q^T W, whose
    left factor is rotated back by Q (orthogonal, so the balanced split is kept). Neither side is pseudo-inverted:
    C never is (``two_sided_lowrank``), and G's eigenvalues are lifted above ``floor`` x their mean.
    Float64 inside; returned in float32 (float64 stays float64).
    """
    _check_matrix(weight)
    check_rank(rank, tuple(weight.shape))
    _check_output_side(weight, output_gram)
    out_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    basis, weights = output_eigenbasis(output_gram.to(weight.device), damping)
    left, right = two_sided_lowrank(basis.T @ weight.double(), rank, row_weights=weights, input_sqrt=input_sqrt)
    return (basis @ left).to(out_dtype), right.to(out_dtype)


def kronecker_spectrum(weight: Tensor, output_gram: Tensor, input_sqrt: Tensor | None = None, damping: float = 0.0) -> Tensor:
    """Singular values s of G^1/2 W C (G lifted as in ``kronecker_lowrank``): dropping component i costs s_i^2 in
    tr(dW^T G dW A), i.e. 0.5 s_i^2 in the second-order loss model when G and A are per-token means."""
    _check_matrix(weight)
    _check_output_side(weight, output_gram)
    basis, weights = output_eigenbasis(output_gram.to(weight.device), damping)
    return weighted_spectrum(basis.T @ weight.double(), weights, input_sqrt)


def kronecker_error(weight: Tensor, approx: Tensor, output_gram: Tensor, input_gram: Tensor) -> float:
    """tr((W - W')^T G (W - W') A): the Kronecker second-order loss model's error (twice the loss estimate)."""
    difference = weight.double() - approx.double().to(weight.device)
    return float(torch.trace(difference.T @ output_gram.double().to(weight.device) @ difference @ input_gram.double().to(weight.device)))


def row_weighted_svd(weight: Tensor, rank: int, row_importance: Tensor) -> tuple[Tensor, Tensor]:
    """FWSVD: the best rank-k fit under sum_i r_i ||W_i - W'_i||^2 with r_i the importance of row i."""
    return two_sided_lowrank(weight, rank, row_weights=safe_weights(_check_vector(row_importance, weight.shape[0], "row_importance")))


def asvd_scales(input_abs_mean: Tensor, alpha: float = 0.5) -> Tensor:
    """ASVD's per-input-column scale: (mean |x_j|) ** alpha, zeros lifted so that no column is lost."""
    if not 0 <= alpha <= 2:
        raise InvalidArgument("alpha", f"{alpha} is outside [0, 2]", "0 <= alpha <= 2 (ASVD uses 0.5)")
    return safe_weights(input_abs_mean.double()) ** alpha


def activation_scaled_svd(weight: Tensor, rank: int, input_abs_mean: Tensor, alpha: float = 0.5) -> tuple[Tensor, Tensor]:
    """ASVD: SVD of W diag(s) with s_j = mean|x_j| ** alpha, so heavily used input columns are kept better."""
    scales = asvd_scales(_check_vector(input_abs_mean, weight.shape[1], "input_abs_mean"), alpha)
    return two_sided_lowrank(weight, rank, input_sqrt=torch.diag(scales))


def whitened_svd(weight: Tensor, rank: int, input_gram: Tensor, damping: float = 0.0) -> tuple[Tensor, Tensor]:
    """SVD-LLM truncation-aware whitening: the best rank-k fit of the outputs, min ||(W - W') X||_F."""
    root, _ = psd_sqrt(input_gram, damping)
    return two_sided_lowrank(weight, rank, input_sqrt=root)


def fisher_output_weights(fisher: Tensor, input_sq_mean: Tensor) -> Tensor:
    """Per output row, E[g_i^2] implied by a diagonal Fisher I_ij ~ E[g_i^2] E[x_j^2].

    Summing over j: sum_j I_ij ~ E[g_i^2] sum_j E[x_j^2], so the row sums divided by the input energy
    put the row weight in loss units (nats per squared output error per token).
    """
    energy = input_sq_mean.double().sum().clamp_min(torch.finfo(torch.float64).tiny)
    return fisher.double().sum(1) / energy


def weighted_error(weight: Tensor, approx: Tensor, importance: Tensor) -> float:
    """sum_ij I_ij (W - W')_ij^2: the element-wise weighted error TFWSVD minimizes (and, halved, a
    second-order estimate of the loss increase when I is the Fisher information)."""
    difference = weight.double() - approx.double().to(weight.device)
    return float((importance.double().to(weight.device) * difference * difference).sum())


@dataclass
class WeightedFitReport:
    """What the element-wise optimizer did: errors before and after, steps taken per phase, why it stopped."""

    start_error: float
    final_error: float
    adam_steps: int = 0
    sgd_steps: int = 0
    stopped: str = ""
    seconds: float = 0.0
    history: list[float] = field(default_factory=list)


def elementwise_weighted_lowrank(
    weight: Tensor,
    importance: Tensor,
    start: tuple[Tensor, Tensor],
    *,
    adam_steps: int = 200,
    sgd_steps: int = 100,
    adam_lr: float = 1e-3,
    sgd_lr: float | None = None,
    tolerance: float = 1e-4,
    patience: int = 20,
    device: str | torch.device | None = None,
) -> tuple[Tensor, Tensor, WeightedFitReport]:
    """TFWSVD: minimize sum_ij I_ij (W - L R)_ij^2 from a start (FWSVD), Adam then SGD, as Hua et al. do.

    Each phase stops early when the best error has improved by less than ``tolerance`` (relative) over
    the last ``patience`` steps. Importance is normalized by its mean (the minimizer does not change).
    The best factors seen are returned, so the result is never worse than the start. Runs on ``device``
    (default: CUDA when available, else the weight's device). ``sgd_lr`` defaults to a step that is
    stable for this quadratic: 0.5 / (max importance x (||L||^2 + ||R||^2) spectral bound).
    """
    _check_matrix(weight)
    if importance.shape != weight.shape:
        raise InvalidArgument("importance", f"has shape {tuple(importance.shape)}", f"the weight's shape {tuple(weight.shape)}")
    if not torch.isfinite(importance).all() or (importance < 0).any():
        raise InvalidArgument("importance", "has negative, NaN or inf entries", "finite non-negative importance")
    for name, value in (("adam_steps", adam_steps), ("sgd_steps", sgd_steps), ("patience", patience)):
        if value < 0:
            raise InvalidArgument(name, f"{value} is negative", "an integer >= 0")
    begin = time.perf_counter()
    device = torch.device(device) if device is not None else (torch.device("cuda") if torch.cuda.is_available() else weight.device)
    target = weight.detach().float().to(device)
    mean = importance.double().mean()
    scale = importance.float().to(device) / (float(mean) if mean > 0 else 1.0)
    left = start[0].detach().float().to(device).clone().requires_grad_(True)
    right = start[1].detach().float().to(device).clone().requires_grad_(True)
    denominator = float((scale * target * target).sum()) or 1.0  # errors are tracked relative to sum I W^2

    def objective() -> Tensor:
        residual = target - left @ right
        return (scale * residual * residual).sum() / denominator

    with torch.no_grad():
        start_value = float(objective())
    best = (start_value, left.detach().clone(), right.detach().clone())
    report = WeightedFitReport(start_error=start_value, final_error=start_value)
    if sgd_lr is None:
        with torch.no_grad():
            bound = float(scale.max()) * (float(torch.linalg.matrix_norm(left, 2)) ** 2 + float(torch.linalg.matrix_norm(right, 2)) ** 2)
        sgd_lr = 0.5 * denominator / max(bound, 1e-30)
    reasons = []
    for phase, steps, optimizer in (
        ("adam", adam_steps, lambda: torch.optim.Adam([left, right], lr=adam_lr)),
        ("sgd", sgd_steps, lambda: torch.optim.SGD([left, right], lr=sgd_lr, momentum=0.9)),
    ):
        if steps == 0:
            continue
        with torch.no_grad():
            left.copy_(best[1])
            right.copy_(best[2])
        opt = optimizer()
        window_start = best[0]
        taken = 0
        reason = "step limit"
        for step in range(1, steps + 1):
            opt.zero_grad(set_to_none=True)
            value = objective()
            value.backward()
            current = float(value.detach())
            if not math.isfinite(current):
                reason = "diverged (non-finite)"
                break
            if current < best[0]:
                best = (current, left.detach().clone(), right.detach().clone())
            report.history.append(current)
            opt.step()
            taken = step
            if step % patience == 0:
                if best[0] > window_start * (1 - tolerance):
                    reason = f"converged (<{tolerance:g} relative gain in {patience} steps)"
                    break
                window_start = best[0]
        with torch.no_grad():
            final = float(objective())
        if math.isfinite(final) and final < best[0]:
            best = (final, left.detach().clone(), right.detach().clone())
        if phase == "adam":
            report.adam_steps = taken
        else:
            report.sgd_steps = taken
        reasons.append(f"{phase}: {reason}")
    report.final_error = best[0]
    report.stopped = "; ".join(reasons)
    report.seconds = time.perf_counter() - begin
    out_device = weight.device
    return best[1].to(out_device), best[2].to(out_device), report
