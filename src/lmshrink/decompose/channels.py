"""Channel selection with least-squares compensation (a Nystrom approximation of the consumer's input).

An MLP computes y = W h(x), with h's D channels made elementwise from producers' rows (h = act(G x) * U x). Keeping
channels S removes those rows of the producers and columns of W; the best consumer on what is left is
W_S = W C[:, S] C[S, S]^-1 (C = E[h h^T], least squares against the original output), so the dropped channels are
predicted from the kept ones instead of zeroed. The channels are chosen by backward elimination: drop, one at a
time, the channel whose removal raises the error of the refitted output least. The order is nested, so one
elimination serves every keep count (a global allocation picks one per MLP from the rises).
"""

from __future__ import annotations

import torch


def _regularized(gram: torch.Tensor, damping: float) -> torch.Tensor:
    gram = gram.double()
    ridge = damping * float(gram.diagonal().mean().clamp_min(1e-300))
    return gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)


def elimination_order(consumer: torch.Tensor, gram: torch.Tensor, remove: int, damping: float = 1e-4
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(the first ``remove`` channels to drop, in order; the rise of the output error each drop causes).

    ``consumer`` (out, D) reads channels whose second moment is ``gram`` (D, D, any positive scale); ``damping`` is a
    ridge added to ``gram``, relative to its mean diagonal. Rises are in E||W h - W_S h_S||^2 units (``gram``'s
    scale); the first j of them sum to the error of keeping all but the first j channels, refitted. Weighting the
    consumer's rows (G^1/2 W, G the output-gradient Gram) puts them in loss units; the refit itself does not change.
    """
    channels = consumer.shape[1]
    if gram.shape != (channels, channels):
        raise ValueError(f"gram is {tuple(gram.shape)}, expected ({channels}, {channels}) for a consumer of {channels} inputs")
    if not 0 <= remove < channels:
        raise ValueError(f"remove is {remove}; allowed: 0 to {channels - 1} (at least one channel stays)")
    precision = torch.linalg.inv(_regularized(gram, damping))
    coefficients = consumer.double().clone()  # W_S for the current set, as (out, D) with zeros at dropped channels
    alive = torch.ones(channels, dtype=torch.bool, device=gram.device)
    order, rises = [], []
    for _ in range(remove):
        # Dropping j from a least-squares fit raises its error by |b_j|^2 / P_jj (b_j: j's coefficients, P: precision).
        rise = (coefficients ** 2).sum(0) / precision.diagonal().clamp_min(1e-300)
        rise[~alive] = float("inf")
        j = int(rise.argmin())
        order.append(j)
        rises.append(float(rise[j]))
        column, pivot = precision[:, j].clone(), precision[j, j]
        coefficients -= torch.outer(coefficients[:, j], column) / pivot
        precision -= torch.outer(column, column) / pivot
        alive[j] = False
        coefficients[:, j] = 0
        precision[j, :] = 0
        precision[:, j] = 0
        precision[j, j] = 1  # keeps the diagonal divisible; j is never chosen again
    return torch.tensor(order, dtype=torch.long), torch.tensor(rises, dtype=torch.float64)


def refit_consumer(consumer: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, damping: float = 1e-4) -> torch.Tensor:
    """W C'[:, S] C'[S, S]^-1 (S = ``kept``, C' = C + lambda I): the consumer (out, len(kept)) that best reproduces W h
    from h_S, plus lambda ||W_S - W[:, S]||^2. The ridge pulls the refit toward the plain pruned columns rather than
    toward zero (the same regularized Gram as elimination_order), which bounds the compensation on text unlike the
    calibration text."""
    regular = _regularized(gram, damping)
    kept = kept.to(regular.device)
    return torch.linalg.solve(regular[kept][:, kept], (consumer.double() @ regular[:, kept]).T).T.to(consumer.dtype)


def kept_after(order: torch.Tensor, channels: int, removed: int) -> torch.Tensor:
    """The channels left (ascending) once the first ``removed`` of ``order`` are dropped."""
    alive = torch.ones(channels, dtype=torch.bool)
    alive[order[:removed]] = False
    return alive.nonzero().squeeze(1)
