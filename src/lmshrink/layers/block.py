"""Block low-rank vocabulary tables (GroupReduce): each token group g has its own factors left_g (n_g, r_g) @ right_g (r_g, d).

``BlockLowRankEmbedding`` replaces a (V, d) input embedding (and, through ``logits``, a tied output layer via
lmshrink.layers.lowrank.TiedHead); ``BlockLowRankOutput`` replaces an untied (V, d) output layer. The token -> group
map is the only index stored (one uint8 per token when there are <= 256 groups); a token's row inside its group is
its rank among the group's ids, rebuilt on load. Factors are float parameters, or k-bit packed integers
(``bits``) held as buffers so they are saved and counted exactly.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmshrink.layers.base import FactorizedModule, config_bool, config_int, config_int_list, register_layer
from lmshrink.layers.quantized import PackedTensor, config_bits


def _index_dtype(groups: int) -> torch.dtype:
    return torch.uint8 if groups <= 256 else torch.int16 if groups <= 32767 else torch.int32


class _BlockLowRankTable(FactorizedModule):
    """Shared storage and arithmetic of the block low-rank embedding and output layer."""

    def __init__(self, vocab_size: int, dim: int, sizes: list[int], ranks: list[int], bits: int | None = None,
                 group_size: int | None = None, frequencies: dict | None = None, dtype=None):
        super().__init__()
        if len(sizes) != len(ranks) or sum(sizes) != vocab_size:
            raise ValueError(f"group sizes {sizes} must sum to the vocabulary {vocab_size}, one rank per group")
        self.vocab_size, self.dim = vocab_size, dim
        self.sizes, self.ranks = [int(n) for n in sizes], [int(r) for r in ranks]
        self.bits, self.group_size, self.frequencies = bits, group_size, frequencies
        self.register_buffer("token_group", torch.zeros(vocab_size, dtype=_index_dtype(len(sizes))))
        if bits is None:
            self.lefts = nn.ParameterList([nn.Parameter(torch.zeros(n, r, dtype=dtype)) for n, r in zip(self.sizes, self.ranks)])
            self.rights = nn.ParameterList([nn.Parameter(torch.zeros(r, dim, dtype=dtype)) for r in self.ranks])
        else:
            self.lefts_q = nn.ModuleList([PackedTensor((n, r), bits, group_size) for n, r in zip(self.sizes, self.ranks)])
            self.rights_q = nn.ModuleList([PackedTensor((r, dim), bits, group_size) for r in self.ranks])
        self._index: tuple[Tensor, Tensor] | None = None
        self.register_load_state_dict_post_hook(lambda module, keys: module._forget_index())

    # -- building ------------------------------------------------------------------------------------------------
    @classmethod
    def from_factors(cls, factors, *, bits: int | None = None, group_size: int | None = None,
                     frequencies: dict | None = None, dtype=None, **extra) -> "_BlockLowRankTable":
        """From lmshrink.decompose.groupreduce.BlockFactors, optionally quantizing every factor to ``bits``."""
        dtype = dtype or factors.lefts[0].dtype
        layer = cls(factors.vocab_size, factors.dim, factors.sizes, factors.ranks, bits, group_size, frequencies,
                    dtype=dtype, **extra)
        owner = factors.assignment()
        layer.token_group.copy_(owner.to(layer.token_group.dtype))
        with torch.no_grad():
            for g, (left, right) in enumerate(zip(factors.lefts, factors.rights)):
                if bits is None:
                    layer.lefts[g].copy_(left)
                    layer.rights[g].copy_(right)
                else:
                    layer.lefts_q[g] = PackedTensor.from_tensor(left, bits, group_size)
                    layer.rights_q[g] = PackedTensor.from_tensor(right, bits, group_size)
        layer._forget_index()
        return layer

    def _forget_index(self) -> None:
        self._index = None

    def _apply(self, fn, *args, **kwargs):
        self._forget_index()
        return super()._apply(fn, *args, **kwargs)

    def index(self) -> tuple[Tensor, Tensor]:
        """(group of each token, row of each token inside its group), both (V,) long, derived from ``token_group``."""
        if self._index is None:
            group = self.token_group.long()
            order = torch.argsort(group * self.vocab_size + torch.arange(self.vocab_size, device=group.device))
            counts = torch.bincount(group, minlength=len(self.sizes))
            if counts.tolist() != self.sizes:
                from lmshrink.errors import CorruptFile

                raise CorruptFile(f"block table: group sizes {counts.tolist()} do not match the config {self.sizes}")
            starts = torch.cumsum(counts, 0) - counts
            row = torch.empty_like(group)
            row[order] = torch.arange(self.vocab_size, device=group.device) - starts[group[order]]
            self._index = (group, row)
        return self._index

    def factor(self, g: int) -> tuple[Tensor, Tensor]:
        if self.bits is None:
            return self.lefts[g], self.rights[g]
        return self.lefts_q[g].value(), self.rights_q[g].value()

    def groups(self) -> list[Tensor]:
        """Token ids of each group, ascending."""
        group, _ = self.index()
        return [torch.nonzero(group == g).flatten() for g in range(len(self.sizes))]

    # -- arithmetic ----------------------------------------------------------------------------------------------
    def lookup(self, ids: Tensor) -> Tensor:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise IndexError(f"token ids must lie in [0, {self.vocab_size}); got [{int(ids.min())}, {int(ids.max())}]")
        group, row = self.index()
        flat = ids.flatten()
        token_group, token_row = group[flat], row[flat]
        pieces, where = [], []
        for g in range(len(self.sizes)):
            hit = torch.nonzero(token_group == g).flatten()
            if hit.numel():
                left, right = self.factor(g)
                pieces.append(F.embedding(token_row[hit], left) @ right)
                where.append(hit)
        if not pieces:
            return self.factor(0)[1].new_zeros(*ids.shape, self.dim)
        out = torch.cat(pieces)[torch.argsort(torch.cat(where))]
        return out.view(*ids.shape, self.dim)

    def logits(self, hidden: Tensor) -> Tensor:
        """hidden @ W.T for all V tokens through the factors: one (d -> sum r) product, then one small one per group."""
        factors = [self.factor(g) for g in range(len(self.sizes))]
        codes = F.linear(hidden, torch.cat([right for _, right in factors]).to(hidden.dtype))
        parts, start = [], 0
        for left, right in factors:
            parts.append(F.linear(codes[..., start:start + right.shape[0]], left.to(hidden.dtype)))
            start += right.shape[0]
        grouped = torch.cat(parts, -1)  # columns in group order
        return grouped.index_select(-1, self._gather_order())

    def _gather_order(self) -> Tensor:
        # Column of token t in the group-ordered logits: offset of its group plus its row inside the group.
        group, row = self.index()
        offsets = torch.tensor([0] + self.sizes[:-1], device=group.device).cumsum(0)
        return offsets[group] + row

    def dense_weight(self) -> Tensor:
        out = None
        for g, ids in enumerate(self.groups()):
            left, right = self.factor(g)
            block = left @ right
            out = block.new_zeros(self.vocab_size, self.dim) if out is None else out
            out[ids] = block
        return out

    def factor_parameters(self) -> int:
        return sum(r * (n + self.dim) for n, r in zip(self.sizes, self.ranks))

    def layer_config(self) -> dict[str, Any]:
        return {"vocab_size": self.vocab_size, "dim": self.dim, "sizes": self.sizes, "ranks": self.ranks,
                "bits": self.bits, "group_size": self.group_size, "frequencies": self.frequencies}

    def extra_repr(self) -> str:
        bits = f", bits={self.bits}" if self.bits is not None else ""
        return f"{self.vocab_size}, {self.dim}, groups={len(self.sizes)}, ranks={self.ranks}{bits}"


def _table_config(config: dict[str, Any], layer: str) -> tuple:
    """(vocab_size, dim, sizes, ranks, bits, group_size, frequencies) of a block table's config, validated."""
    sizes, ranks = config_int_list(config, "sizes", layer), config_int_list(config, "ranks", layer)
    frequencies = config.get("frequencies")
    return (config_int(config, "vocab_size", layer), config_int(config, "dim", layer), sizes, ranks,
            config_bits(config, layer, optional=True), config_int(config, "group_size", layer, optional=True),
            frequencies if isinstance(frequencies, dict) else None)


@register_layer
class BlockLowRankEmbedding(_BlockLowRankTable):
    """Input embedding: token -> its group's code row @ the group's basis. ``logits`` serves a tied output layer."""

    def __init__(self, vocab_size: int, dim: int, sizes: list[int], ranks: list[int], bits: int | None = None,
                 group_size: int | None = None, frequencies: dict | None = None, padding_idx: int | None = None, dtype=None):
        super().__init__(vocab_size, dim, sizes, ranks, bits, group_size, frequencies, dtype=dtype)
        self.padding_idx = padding_idx

    @property
    def num_embeddings(self) -> int:  # what TiedHead and nn.Embedding users read
        return self.vocab_size

    @property
    def embedding_dim(self) -> int:
        return self.dim

    def forward(self, ids: Tensor) -> Tensor:
        return self.lookup(ids)

    def layer_config(self) -> dict[str, Any]:
        return {**super().layer_config(), "padding_idx": self.padding_idx}

    @classmethod
    def from_config(cls, config: dict[str, Any], model: nn.Module) -> "BlockLowRankEmbedding":
        return cls(*_table_config(config, cls.__name__),
                   padding_idx=config_int(config, "padding_idx", cls.__name__, minimum=0, optional=True, default=None))


@register_layer
class BlockLowRankOutput(_BlockLowRankTable):
    """Untied output layer (V, d): logits = hidden @ W.T (+ bias) computed group by group through the factors."""

    def __init__(self, vocab_size: int, dim: int, sizes: list[int], ranks: list[int], bits: int | None = None,
                 group_size: int | None = None, frequencies: dict | None = None, bias: bool = False, dtype=None):
        super().__init__(vocab_size, dim, sizes, ranks, bits, group_size, frequencies, dtype=dtype)
        self.bias = nn.Parameter(torch.zeros(vocab_size, dtype=dtype)) if bias else None

    @property
    def in_features(self) -> int:
        return self.dim

    @property
    def out_features(self) -> int:
        return self.vocab_size

    def forward(self, hidden: Tensor) -> Tensor:
        logits = self.logits(hidden)
        return logits if self.bias is None else logits + self.bias

    def layer_config(self) -> dict[str, Any]:
        return {**super().layer_config(), "bias": self.bias is not None}

    @classmethod
    def from_config(cls, config: dict[str, Any], model: nn.Module) -> "BlockLowRankOutput":
        return cls(*_table_config(config, cls.__name__), bias=config_bool(config, "bias", cls.__name__, default=False))
