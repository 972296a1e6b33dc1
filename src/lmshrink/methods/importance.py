"""Importance-aware low-rank methods: each one keeps what calibration says matters, not what is largest.

- ``fwsvd``   Fisher-weighted SVD (Hsu et al., ICLR 2022): rows weighted by their summed Fisher information.
- ``tfwsvd``  element-wise Fisher-weighted low rank (Hua et al., EMNLP 2022): FWSVD, then Adam and SGD on
              sum_ij I_ij (W - L R)_ij^2.
- ``asvd``    activation-aware SVD (Yuan et al. 2023): input columns scaled by mean |activation| ** alpha.
- ``svdllm``  SVD-LLM truncation-aware whitening (Wang et al. 2024) with the input Gram matrix, no LoRA.
- ``fwhiten`` Fisher rows x Gram whitening: the closed-form minimizer of the Kronecker second-order loss
              model 1/2 tr(dW^T G dW A) (G: output-gradient scale from the Fisher, A: input second moment).
- ``kfac``    the same model with the full token-wise Fisher at the output, G = E[g g^T] (K-FAC's output factor,
              Martens & Grosse 2015): the SVD of G^1/2 W A^1/2. Holds an out x out float64 G per target
              (SmolLM2: up to 1536^2 = 19 MB; a 70B model's 28672-wide MLP: 6.6 GB each, so its block-by-block
              run needs that much memory per matrix on top of the input Gram).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmshrink.bounds import Bounds
from lmshrink.decompose.weighted import (
    activation_scaled_svd,
    asvd_scales,
    elementwise_weighted_lowrank,
    fisher_output_weights,
    kronecker_lowrank,
    kronecker_spectrum,
    psd_sqrt,
    row_weighted_svd,
    safe_weights,
    two_sided_lowrank,
    weighted_error,
    weighted_spectrum,
    whitened_svd,
)
from lmshrink.decompose.svd import truncated_svd
from lmshrink.methods import MethodOptions, option, register_method, required_stat


@dataclass(frozen=True)
class WhitenOptions(MethodOptions):
    whiten_damping: float = option(0.0, "add this fraction of the Gram's mean diagonal before factorizing", bounds=Bounds(0, 1000))


@dataclass(frozen=True)
class KFACOptions(MethodOptions):
    whiten_damping: float = option(0.0, "add this fraction of the Gram's mean diagonal before factorizing", bounds=Bounds(0, 1000))
    grad_damping: float = option(0.0, "add this fraction of the output-gradient Gram's mean diagonal before factorizing",
                                 bounds=Bounds(0, 1000))


@dataclass(frozen=True)
class TFWSVDOptions(MethodOptions):
    tfwsvd_adam_steps: int = option(100, "at most this many Adam steps per matrix", bounds=Bounds(0, 100_000))
    tfwsvd_sgd_steps: int = option(50, "at most this many SGD steps per matrix after Adam", bounds=Bounds(0, 100_000))
    tfwsvd_lr: float = option(1e-3, "Adam learning rate", bounds=Bounds(0, 1, low_open=True))
    tfwsvd_tolerance: float = option(1e-3, "stop a phase when the weighted error gains less than this (relative) in 10 steps",
                                     bounds=Bounds(0, 1))


@dataclass(frozen=True)
class ASVDOptions(MethodOptions):
    asvd_alpha: float = option(0.5, "exponent of the activation scale (0 = plain SVD)", bounds=Bounds(0, 2))


# How each method scores truncation for the sensitivity allocation (lmshrink.budget): the spectrum it truncates.
# Fisher-based ones are in loss units (a second-order estimate of the loss increase, comparable across matrices);
# the others are relative to each matrix's total, the usual proxy.

def _mean_input_gram(stats: dict, method: str) -> torch.Tensor:
    # input_gram is a sum over tokens; its token count is recovered from input_sq_mean (a mean) for per-token units.
    gram, square_mean = required_stat(stats, "input_gram", method), required_stat(stats, "input_sq_mean", method)
    count = float(gram.double().diagonal().sum() / square_mean.double().sum().clamp_min(1e-300))
    return gram.double() / max(count, 1.0)


def fisher_spectrum(weight, stats, options):
    """Fisher (fwsvd, tfwsvd): singular values of diag(mean row Fisher)^1/2 W, in loss units."""
    rows = safe_weights(required_stat(stats, "fisher", "fwsvd/tfwsvd").double().mean(1))  # sum_j I_ij d_ij^2 ~ mean_j I_ij ||d_i||^2
    return 0.5 * weighted_spectrum(weight, rows) ** 2, True


def fisher_whitened_spectrum(weight, stats, options: WhitenOptions):
    """Fisher + input Gram (fwhiten): singular values of G^1/2 W A^1/2, in loss units."""
    fisher, square_mean = required_stat(stats, "fisher", "fwhiten"), required_stat(stats, "input_sq_mean", "fwhiten")
    root, _ = psd_sqrt(_mean_input_gram(stats, "fwhiten"), options.whiten_damping)
    rows = safe_weights(fisher_output_weights(fisher, square_mean))
    return 0.5 * weighted_spectrum(weight, rows, root) ** 2, True


def kfac_spectrum(weight, stats, options: KFACOptions):
    """Output-gradient Gram + input Gram (kfac): singular values of G^1/2 W A^1/2 (both per-token means), in loss units.

    G holds gradients of the window's mean loss, as the Fisher does, so the scale is per token of that loss: roughly a
    window length below fwhiten's Fisher-derived rows (measured 40-120x at 32 tokens on the tiny test LLaMA). It is the
    same factor for every matrix of a model, so the global budget of the sensitivity allocation is spent the same way.
    """
    grad_gram = required_stat(stats, "output_grad_gram", "kfac", (weight.shape[0], weight.shape[0])).to(weight.device)
    root, _ = psd_sqrt(_mean_input_gram(stats, "kfac").to(weight.device), options.whiten_damping)
    return 0.5 * kronecker_spectrum(weight, grad_gram, root, options.grad_damping) ** 2, True


def whitened_spectrum(weight, stats, options: WhitenOptions):
    """Input Gram (svdllm): singular values of W C, C C^T = Gram, relative."""
    root, _ = psd_sqrt(required_stat(stats, "input_gram", "svdllm"), options.whiten_damping)
    values = weighted_spectrum(weight, None, root) ** 2
    return values / values.sum().clamp_min(1e-300), False


def activation_spectrum(weight, stats, options: ASVDOptions):
    """Input |x| means (asvd): singular values of W diag(s), relative."""
    scales = asvd_scales(required_stat(stats, "input_abs_mean", "asvd"), options.asvd_alpha)
    values = weighted_spectrum(weight, None, torch.diag(scales)) ** 2
    return values / values.sum().clamp_min(1e-300), False


@register_method("fwsvd", summary="Fisher-weighted SVD (Hsu et al. 2022): rows weighted by summed Fisher information",
                 needs=("fisher",), error_spectrum=fisher_spectrum)
def fwsvd(weight, rank, stats, options):
    fisher = required_stat(stats, "fisher", "fwsvd", weight.shape).to(weight.device)
    return row_weighted_svd(weight, rank, fisher.double().sum(1))


@register_method(
    "tfwsvd",
    summary="TFWSVD (Hua et al. 2022): element-wise Fisher-weighted low rank, FWSVD then Adam + SGD",
    needs=("fisher",),
    options=TFWSVDOptions,
    error_spectrum=fisher_spectrum,
)
def tfwsvd(weight, rank, stats, options: TFWSVDOptions):
    fisher = required_stat(stats, "fisher", "tfwsvd", weight.shape).to(weight.device)
    start = row_weighted_svd(weight, rank, fisher.double().sum(1))
    left, right, _ = elementwise_weighted_lowrank(
        weight, fisher, start, adam_steps=options.tfwsvd_adam_steps, sgd_steps=options.tfwsvd_sgd_steps,
        adam_lr=options.tfwsvd_lr, tolerance=options.tfwsvd_tolerance, patience=10)
    return left, right


@register_method(
    "asvd",
    summary="ASVD (Yuan et al. 2023): input columns scaled by mean |activation| ** alpha before SVD",
    needs=("input_abs_mean",),
    options=ASVDOptions,
    target_kinds=("linear",),
    error_spectrum=activation_spectrum,
)
def asvd(weight, rank, stats, options: ASVDOptions):
    scale = required_stat(stats, "input_abs_mean", "asvd", (weight.shape[1],)).to(weight.device)
    return activation_scaled_svd(weight, rank, scale, options.asvd_alpha)


@register_method(
    "svdllm",
    summary="SVD-LLM truncation-aware whitening with the input Gram matrix (no LoRA); safe on singular Grams",
    needs=("input_gram",),
    options=WhitenOptions,
    target_kinds=("linear",),
    error_spectrum=whitened_spectrum,
)
def svdllm(weight, rank, stats, options: WhitenOptions):
    gram = required_stat(stats, "input_gram", "svdllm", (weight.shape[1], weight.shape[1])).to(weight.device)
    return whitened_svd(weight, rank, gram, options.whiten_damping)


@register_method(
    "fwhiten",
    summary="Fisher-scaled rows x Gram-whitened columns: closed-form minimizer of the Kronecker second-order loss model",
    needs=("fisher", "input_gram", "input_sq_mean"),
    options=WhitenOptions,
    target_kinds=("linear",),
    error_spectrum=fisher_whitened_spectrum,
)
def fwhiten(weight, rank, stats, options: WhitenOptions):
    fisher = required_stat(stats, "fisher", "fwhiten", weight.shape).to(weight.device)
    gram = required_stat(stats, "input_gram", "fwhiten", (weight.shape[1], weight.shape[1])).to(weight.device)
    square_mean = required_stat(stats, "input_sq_mean", "fwhiten", (weight.shape[1],)).to(weight.device)
    rows = safe_weights(fisher_output_weights(fisher, square_mean))
    root, _ = psd_sqrt(gram, options.whiten_damping)
    return two_sided_lowrank(weight, rank, row_weights=rows, input_sqrt=root)


def weighted_errors(weight: torch.Tensor, rank: int, fisher: torch.Tensor, **tfwsvd_options) -> dict:
    """Fisher-weighted error sum_ij I_ij (W - W')^2 of SVD, FWSVD and TFWSVD at one rank (and TFWSVD's fit report)."""
    import time

    svd_left, svd_right = truncated_svd(weight.float(), rank)
    begin = time.perf_counter()
    fw = row_weighted_svd(weight, rank, fisher.double().sum(1))
    fwsvd_seconds = time.perf_counter() - begin
    tf_left, tf_right, report = elementwise_weighted_lowrank(weight, fisher, fw, **tfwsvd_options)
    return {
        "svd": weighted_error(weight, svd_left @ svd_right, fisher),
        "fwsvd": weighted_error(weight, fw[0] @ fw[1], fisher),
        "tfwsvd": weighted_error(weight, tf_left @ tf_right, fisher),
        "fwsvd_seconds": fwsvd_seconds,
        "tfwsvd_seconds": report.seconds,
        "tfwsvd_steps": report.adam_steps + report.sgd_steps,
        "tfwsvd_stopped": report.stopped,
    }


@register_method(
    "kfac",
    summary="KFAC / token-wise Fisher whitening: SVD of G^1/2 W A^1/2, G = E[g g^T] at the output, A the input Gram",
    needs=("output_grad_gram", "input_gram", "input_sq_mean"),
    options=KFACOptions,
    target_kinds=("linear",),
    error_spectrum=kfac_spectrum,
)
def kfac(weight, rank, stats, options: KFACOptions):
    """The exact minimizer of the Kronecker loss model 1/2 tr(dW^T G dW A) with the full output-gradient Gram G."""
    grad_gram = required_stat(stats, "output_grad_gram", "kfac", (weight.shape[0], weight.shape[0])).to(weight.device)
    gram = required_stat(stats, "input_gram", "kfac", (weight.shape[1], weight.shape[1])).to(weight.device)
    root, _ = psd_sqrt(gram, options.whiten_damping)
    return kronecker_lowrank(weight, rank, grad_gram, root, options.grad_damping)
