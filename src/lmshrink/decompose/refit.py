"""Error-compensating refit of a low-rank factorization: the left factor that best reproduces a layer's original
outputs from the inputs the compressed model actually gives it.

With W (out, in) the original matrix, x_o its inputs in the original model and x_c the inputs it gets once the
layers before it are compressed, and the right factor R (k, in) kept, the left factor L (out, k) solves

    min_L  sum over tokens of || W x_o - L R x_c ||^2

in closed form from three sums over tokens: Coc = sum x_o x_c^T, Ccc = sum x_c x_c^T (and Coo = sum x_o x_o^T for
the error itself). The problem separates by output row, so the answer is the same under any per-row weighting:
the Fisher row weights of fwsvd/fwhiten do not change it.
"""

from __future__ import annotations

import torch
from torch import Tensor


def refit_left(weight: Tensor, right: Tensor, cross: Tensor, gram: Tensor, damp: float = 1e-6) -> Tensor:
    """The left factor minimizing the output error above. ``cross`` = sum x_o x_c^T, ``gram`` = sum x_c x_c^T (in, in).

    Solved in float64: L (R Ccc R^T) = W Coc R^T, with ``damp`` times the mean diagonal added to R Ccc R^T so
    that directions the inputs never excite keep a finite answer. Returns L in ``weight``'s dtype.
    """
    w, r = weight.double(), right.double()
    system = r @ gram.double() @ r.T
    system.diagonal().add_(damp * float(system.diagonal().mean().clamp_min(1e-30)))
    rhs = w @ cross.double() @ r.T
    factor, info = torch.linalg.cholesky_ex(system)
    left = torch.cholesky_solve(rhs.T, factor).T if int(info) == 0 else torch.linalg.lstsq(system, rhs.T).solution.T
    return left.to(weight.dtype)


def output_error(weight: Tensor, left: Tensor, right: Tensor, cross: Tensor, gram: Tensor, original_gram: Tensor) -> float:
    """sum || W x_o - L R x_c ||^2 / sum || W x_o ||^2 from the three sums (``original_gram`` = sum x_o x_o^T)."""
    w, p = weight.double(), (left.double() @ right.double())
    reference = torch.einsum("ij,jk,ik->", w, original_gram.double(), w)
    error = reference - 2 * torch.einsum("ij,jk,ik->", w, cross.double(), p) + torch.einsum("ij,jk,ik->", p, gram.double(), p)
    return float(error.clamp_min(0) / reference.clamp_min(1e-30))
