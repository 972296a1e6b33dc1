"""Truncated SVD and randomized SVD: the baselines every other low-rank method is judged against."""

from __future__ import annotations

from lmshrink.bounds import Bounds
from lmshrink.decompose.svd import truncated_svd
from dataclasses import dataclass

from lmshrink.methods import MethodOptions, option, register_method


@register_method("svd", summary="truncated SVD (Eckart-Young optimal in Frobenius norm)")
def svd(weight, rank, stats, options):
    return truncated_svd(weight, rank)


@dataclass(frozen=True)
class RandomizedSVDOptions(MethodOptions):
    power_iterations: int = option(2, "power iterations (more = closer to exact SVD)", bounds=Bounds(0, 100))


@register_method("rsvd", summary="randomized SVD (Halko et al.): faster on large matrices, near-optimal",
                 options=RandomizedSVDOptions)
def rsvd(weight, rank, stats, options: RandomizedSVDOptions):
    generator = torch_generator(0)
    return truncated_svd(weight, rank, randomized=True, power_iterations=options.power_iterations, generator=generator)


def torch_generator(seed: int):
    import torch

    return torch.Generator().manual_seed(seed)
