"""GroupReduce (Chen et al., NeurIPS 2018): block-wise, frequency-weighted low-rank approximation of a (V, d) table.

The vocabulary is split into groups by frequency; each group g gets its own rank-r_g basis, chosen to minimise the
frequency-weighted reconstruction error  sum_j w_j ||a_j - a_j V_g^T V_g||^2  of its rows, which has a closed form:
the top right singular vectors of the row-scaled block diag(sqrt(w)) A_g. Ranks follow the groups' frequencies under
a parameter budget, and a refinement loop moves each token to the group whose basis reconstructs it best (under the
same budget), recomputes the bases and repeats.

Plain tensor math: no modules. ``counts`` are token counts (already smoothed, see lmshrink.frequencies).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lmshrink.errors import InvalidArgument

SPLITS = ("equal", "geometric")
RANK_RULES = ("frequency", "greedy")


@dataclass
class BlockFactors:
    """The result: group g holds tokens ``groups[g]`` (ascending ids), ``lefts[g] @ rights[g]`` approximates their rows."""

    vocab_size: int
    dim: int
    groups: list[Tensor]
    lefts: list[Tensor]
    rights: list[Tensor]
    history: list[dict] = field(default_factory=list)

    @property
    def ranks(self) -> list[int]:
        return [int(r.shape[0]) for r in self.rights]

    @property
    def sizes(self) -> list[int]:
        return [int(g.numel()) for g in self.groups]

    def params(self) -> int:
        """Factor parameters: sum over groups of r_g (n_g + d). The group index (one small int per token) is extra."""
        return sum(r * (n + self.dim) for r, n in zip(self.ranks, self.sizes))

    def assignment(self) -> Tensor:
        """(V,) group id of every token."""
        owner = torch.empty(self.vocab_size, dtype=torch.long, device=self.rights[0].device)
        for g, ids in enumerate(self.groups):
            owner[ids] = g
        return owner

    def reconstruct(self) -> Tensor:
        out = self.rights[0].new_empty(self.vocab_size, self.dim)
        for ids, left, right in zip(self.groups, self.lefts, self.rights):
            out[ids] = left @ right
        return out


def frequency_weights(counts: Tensor, power: float = 0.5) -> Tensor:
    """Row weights w_j = count_j ** power, scaled to mean 1 (power 1: raw frequency, 0: unweighted)."""
    if power < 0:
        raise InvalidArgument("weight_power", f"{power} is negative", "a number >= 0 (0: unweighted, 0.5: sqrt frequency, 1: frequency)")
    counts = counts.double()
    if (counts <= 0).any():
        raise InvalidArgument("counts", "some token counts are zero or negative", "positive counts: smooth unseen tokens first (lmshrink.frequencies)")
    weights = counts ** power
    return weights / weights.mean()


def split_by_frequency(counts: Tensor, groups: int, scheme: str = "equal") -> list[Tensor]:
    """Token ids in ``groups`` blocks, most frequent first.

    ``equal``: the same number of tokens per block (the paper's split). ``geometric``: block sizes grow by a constant
    factor from the head, so the few very frequent tokens of a power law get blocks of their own.
    """
    vocab = counts.numel()
    check_groups(groups, vocab)
    if scheme not in SPLITS:
        raise InvalidArgument("split", f"{scheme!r} is not a split scheme", f"one of {SPLITS}")
    order = torch.argsort(counts.double(), descending=True, stable=True)
    if scheme == "equal":
        bounds = [round(vocab * g / groups) for g in range(groups + 1)]
    else:
        # Sizes s, s q, s q^2, ... with q = 2 and s chosen so that they sum to the vocabulary.
        ratio = 2.0
        first = vocab * (ratio - 1) / (ratio ** groups - 1)
        bounds = [0] + [round(first * (ratio ** (g + 1) - 1) / (ratio - 1)) for g in range(groups)]
        bounds[-1] = vocab
        for g in range(1, groups + 1):  # at least one token per block
            bounds[g] = max(bounds[g], bounds[g - 1] + 1)
        for g in range(groups - 1, 0, -1):
            bounds[g] = min(bounds[g], bounds[g + 1] - 1)
    return [order[bounds[g]:bounds[g + 1]].sort().values for g in range(groups)]


def check_groups(groups: int, vocab: int) -> None:
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or groups > vocab:
        raise InvalidArgument("groups", f"{groups!r} groups for a vocabulary of {vocab} tokens", f"an integer in 1..{vocab}")


def max_group_rank(size: int, dim: int) -> int:
    """Largest rank whose factors are smaller than the block itself: r (n + d) < n d."""
    return max(1, min(size, dim, (size * dim - 1) // (size + dim)))


def weighted_basis(block: Tensor, weights: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Orthonormal (rank, d) basis minimising sum_j w_j ||a_j - a_j V^T V||^2, and all weighted singular values.

    Closed form: right singular vectors of diag(sqrt(w)) A, found from the d x d weighted Gram matrix (formed in
    the block's precision, at least float32; eigendecomposed in float64).
    """
    work = block if block.dtype == torch.float64 else block.float()
    gram = (work.T @ (work * weights.to(work.dtype)[:, None])).double()
    values, vectors = torch.linalg.eigh(gram)
    values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
    return vectors[:, :rank].T.contiguous(), values.sqrt()


def _weighted_spectrum(matrix: Tensor, weights: Tensor, ids: Tensor) -> Tensor:
    return weighted_basis(matrix[ids], weights[ids], 1)[1]


def allocate_group_ranks(
    sizes: list[int], dim: int, budget: int, *, group_weights: list[float] | None = None,
    spectra: list[Tensor] | None = None, rule: str = "frequency",
) -> list[int]:
    """Rank per group with sum r_g (n_g + d) <= budget.

    ``frequency`` (the paper): r_g proportional to the group's mean weight, scaled to fill the budget.
    ``greedy``: ranks bought one at a time by weighted error removed (squared weighted singular value) per parameter.
    Every group gets at least rank 1 and at most ``max_group_rank``.
    """
    if rule not in RANK_RULES:
        raise InvalidArgument("rank_rule", f"{rule!r} is not a rank rule", f"one of {RANK_RULES}")
    caps = [max_group_rank(n, dim) for n in sizes]
    costs = [n + dim for n in sizes]
    floor = sum(costs)
    if budget < floor:
        raise InvalidArgument("budget", f"{budget} parameters cannot give each of {len(sizes)} groups rank 1 (needs {floor})",
                              "a larger ratio or fewer groups")
    if rule == "frequency":
        if group_weights is None:
            raise ValueError("rule 'frequency' needs group_weights")

        def ranks_at(scale: float) -> list[int]:
            return [min(cap, max(1, int(scale * w))) for cap, w in zip(caps, group_weights)]

        low, high = 0.0, 1.0
        while sum(r * c for r, c in zip(ranks_at(high), costs)) <= budget and ranks_at(high) != caps:
            high *= 2
        for _ in range(100):
            middle = (low + high) / 2
            if sum(r * c for r, c in zip(ranks_at(middle), costs)) <= budget:
                low = middle
            else:
                high = middle
        ranks = ranks_at(low)
        # Leftover budget (from rounding down) goes to groups in order of weight.
        spare = budget - sum(r * c for r, c in zip(ranks, costs))
        for g in sorted(range(len(sizes)), key=lambda g: -group_weights[g]):
            extra = min(caps[g] - ranks[g], spare // costs[g])
            ranks[g] += extra
            spare -= extra * costs[g]
        return ranks
    if spectra is None:
        raise ValueError("rule 'greedy' needs spectra")
    ranks = [1] * len(sizes)
    spare = budget - floor
    heap = [(-float(spectra[g][1] ** 2) / costs[g], g) for g in range(len(sizes)) if caps[g] > 1 and spectra[g].numel() > 1]
    heapq.heapify(heap)
    while heap:
        _, g = heapq.heappop(heap)
        if costs[g] > spare:
            continue  # this group no longer fits; a cheaper one may
        ranks[g] += 1
        spare -= costs[g]
        k = ranks[g]
        if k < caps[g] and k < spectra[g].numel():
            heapq.heappush(heap, (-float(spectra[g][k] ** 2) / costs[g], g))
    return ranks


def check_group_ranks(ranks, sizes: list[int], dim: int) -> list[int]:
    """Explicit per-group ranks: one per group, each in 1..min(group size, d)."""
    ranks = list(ranks)
    if len(ranks) != len(sizes):
        raise InvalidArgument("ranks", f"{len(ranks)} ranks for {len(sizes)} groups", "one rank per group, most frequent group first")
    for g, (rank, size) in enumerate(zip(ranks, sizes)):
        limit = min(size, dim)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
            raise InvalidArgument(f"ranks[{g}]", f"rank {rank!r} for a group of {size} tokens x {dim} columns",
                                  f"an integer in 1..{limit}")
    return ranks


def weighted_error(matrix: Tensor, weights: Tensor, approx: Tensor) -> float:
    """sqrt(sum_j w_j ||a_j - b_j||^2 / sum_j w_j ||a_j||^2): the objective GroupReduce minimises, relative."""
    matrix, approx, weights = matrix.double(), approx.double(), weights.double()
    num = (weights * ((matrix - approx) ** 2).sum(1)).sum()
    den = (weights * (matrix ** 2).sum(1)).sum().clamp_min(1e-300)
    return float((num / den).sqrt())


def _balanced(codes: Tensor, basis: Tensor) -> tuple[Tensor, Tensor]:
    # Spread each component's scale evenly over both factors (as the SVD factors do) so fine-tuning is well conditioned.
    norms = codes.norm(dim=0).clamp_min(1e-12).sqrt()
    return codes / norms, basis * norms[:, None]


def _reassign(matrix: Tensor, weights: Tensor, bases: list[Tensor], ranks: list[int], budget: int) -> Tensor:
    """Each token to the group whose basis reconstructs it best, with a price per rank so the budget still holds.

    Token j in group g costs r_g parameters (its code) and leaves weighted error w_j (||a_j||^2 - ||a_j V_g^T||^2);
    a Lagrange multiplier on the cost is bisected until the total fits the budget.
    """
    dim = matrix.shape[1]
    work = matrix
    energy = (work ** 2).sum(1, keepdim=True)
    errors = torch.cat([energy - ((work @ b.to(work.dtype).T) ** 2).sum(1, keepdim=True) for b in bases], 1)
    errors = errors.double().clamp_min(0) * weights[:, None]
    rank_cost = torch.tensor(ranks, dtype=torch.float64)
    basis_params = dim * sum(ranks)

    def choose(price: float) -> Tensor:
        return torch.argmin(errors + price * rank_cost[None], dim=1)

    def params(owner: Tensor) -> int:
        return basis_params + int(rank_cost[owner].sum())

    owner = choose(0.0)
    if params(owner) <= budget:
        return owner
    low, high = 0.0, float(errors.max()) + 1.0
    for _ in range(60):
        middle = (low + high) / 2
        if params(choose(middle)) <= budget:
            high = middle
        else:
            low = middle
    return choose(high)


def groupreduce(
    matrix: Tensor,
    counts: Tensor,
    budget: int,
    *,
    groups: int = 8,
    weight_power: float = 0.5,
    split: str = "equal",
    rank_rule: str = "frequency",
    refine_steps: int = 5,
    tolerance: float = 1e-3,
    ranks: list[int] | None = None,
) -> BlockFactors:
    """Block low-rank approximation of ``matrix`` (V, d) with at most ``budget`` factor parameters.

    ``counts`` (V,) positive token counts; ``refine_steps`` rounds of reassigning tokens to the best group (0: the
    frequency split is kept); refinement stops early when fewer than ``tolerance`` of the tokens move. The state with
    the lowest weighted error is returned; ``history`` lists every step. ``ranks`` (one per group, most frequent
    group first) replaces the budget rule; ``budget`` is then ignored (pass 0).
    """
    if matrix.dim() != 2:
        raise InvalidArgument("matrix", f"has {matrix.dim()} dimensions", "a 2-D (V, d) table")
    vocab, dim = matrix.shape
    if counts.dim() != 1 or counts.numel() != vocab:
        raise InvalidArgument("counts", f"frequency table has {counts.numel()} entries for a {vocab}-row matrix",
                              f"one count per row ({vocab}): a table made with this model's tokenizer")
    check_groups(groups, vocab)
    if refine_steps < 0:
        raise InvalidArgument("refine_steps", f"{refine_steps} is negative", "an integer >= 0")
    weights = frequency_weights(counts, weight_power)
    members = split_by_frequency(counts, groups, split)
    sizes = [int(m.numel()) for m in members]
    if ranks is not None:
        ranks = check_group_ranks(ranks, sizes, dim)
        budget = sum(r * (n + dim) for r, n in zip(ranks, sizes))
    else:
        spectra = [_weighted_spectrum(matrix, weights, ids) for ids in members] if rank_rule == "greedy" else None
        ranks = allocate_group_ranks(sizes, dim, budget, group_weights=[float(weights[m].mean()) for m in members],
                                     spectra=spectra, rule=rank_rule)
    work = matrix if matrix.dtype == torch.float64 else matrix.float()
    best, history = None, []
    for step in range(refine_steps + 1):
        # Fit each group's basis, then score the whole table.
        bases, approx = [], torch.empty_like(work)
        for g, ids in enumerate(members):
            basis, _ = weighted_basis(work[ids], weights[ids], min(ranks[g], ids.numel(), dim))
            basis = basis.to(work.dtype)
            bases.append(basis)
            approx[ids] = (work[ids] @ basis.T) @ basis
        state = {"step": step, "weighted_error": weighted_error(work, weights, approx),
                 "relative_error": float((work - approx).norm() / work.norm()),
                 "params": sum(b.shape[0] * (m.numel() + dim) for b, m in zip(bases, members)),
                 "sizes": [int(m.numel()) for m in members], "ranks": [int(b.shape[0]) for b in bases]}
        if best is None or state["weighted_error"] < best[0]["weighted_error"]:
            best = (state, [m.clone() for m in members], bases)
        if step == refine_steps:
            history.append(state)
            break
        owner = _reassign(work, weights, bases, [b.shape[0] for b in bases], budget)
        previous = torch.empty(vocab, dtype=torch.long, device=owner.device)
        for g, ids in enumerate(members):
            previous[ids] = g
        moved = int((owner != previous).sum())
        state["moved"] = moved
        history.append(state)
        if moved <= tolerance * vocab:
            break
        kept = [g for g in range(len(members)) if bool((owner == g).any())]  # a group nobody chose disappears
        members = [torch.nonzero(owner == g).flatten() for g in kept]
        ranks = [bases[g].shape[0] for g in kept]
    _, members, bases = best
    lefts, rights = [], []
    for ids, basis in zip(members, bases):
        left, right = _balanced(work[ids] @ basis.T, basis)
        lefts.append(left.to(matrix.dtype if matrix.is_floating_point() else torch.float32))
        rights.append(right.to(lefts[-1].dtype))
    return BlockFactors(vocab, dim, members, lefts, rights, history)


def budget_for_ratio(shape: tuple[int, int], ratio: float) -> int:
    """Factor parameters allowed when a table keeps ``ratio`` of its dense parameters."""
    if not 0 < ratio <= 1:
        raise InvalidArgument("ratio", f"{ratio!r} is outside (0, 1]", "0 < ratio <= 1 (fraction of dense parameters kept)")
    return math.floor(ratio * shape[0] * shape[1])
