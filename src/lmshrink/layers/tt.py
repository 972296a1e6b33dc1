"""Tensor-train embeddings: every token row as its own train (TensorGPT), or the whole table as one TT-matrix.

Both layers look rows up without building the table: the cores of the requested rows are gathered and
contracted in one batched chain of matmuls. A tied output layer (``TiedHead``) calls ``logits``, which
needs every row: by default the table is rebuilt in vocabulary chunks on each call (no memory beyond one
chunk, costs a rebuild per forward: V * sum_k R_{k-1} n_k R_k multiply-adds, well below the V * d * tokens
of the product itself); with ``cache_dense=True`` the rebuilt table is kept after the first call in eval mode
(as fast as a dense head, but holds V x d floats again, so only the stored size shrinks, not memory in use).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmshrink.decompose.tt import (
    BatchedTT,
    tt_matrix_reconstruct,
    tt_matrix_rows,
    tt_parameter_counts,
    tt_reconstruct_batched,
)
from lmshrink.layers.base import FactorizedModule, config_bool, config_int, config_int_list, register_layer

# Rows rebuilt per step when every row is needed (logits, dense_weight): bounds the transient memory.
REBUILD_CHUNK = 8192


def _check_ids(ids: Tensor, num_embeddings: int) -> None:
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"token ids must be an integer tensor, got {ids.dtype}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_embeddings):
        raise IndexError(f"token ids must lie in [0, {num_embeddings}); got [{int(ids.min())}, {int(ids.max())}]")


class _TTTable:
    """What both TT embeddings share: lookup through ``rows(ids)``, tied-head logits with the optional cached
    dense rebuild (kept out of the state dict), and TensorGPT's compression rate."""

    def forward(self, ids: Tensor) -> Tensor:
        _check_ids(ids, self.num_embeddings)
        return self.rows(ids.reshape(-1)).reshape(*ids.shape, self.embedding_dim)

    def logits(self, hidden: Tensor) -> Tensor:
        """hidden @ E.T for a tied output layer (chunked rebuild, or the cached table; see the module docstring)."""
        return self._logits_chunked(hidden)

    def compression_rate(self) -> float:
        """TensorGPT's rate: dense embedding parameters V * d over the trains' parameters."""
        return self.num_embeddings * self.embedding_dim / self.tt_parameters()

    def _set_geometry(self, num_embeddings: int, embedding_dim: int, shape, ranks, padding_idx, vocab_shape=None) -> None:
        """Check and keep the table's TT geometry: one train per token (``vocab_shape`` None) or one TT-matrix."""
        shape, ranks = tuple(int(n) for n in shape), tuple(int(r) for r in ranks)
        if vocab_shape is None:
            if math.prod(shape) != embedding_dim or len(ranks) != len(shape) + 1 or ranks[0] != 1 or ranks[-1] != 1:
                raise ValueError(f"shape {shape} / ranks {ranks} do not describe trains of length {embedding_dim}")
        else:
            vocab_shape = tuple(int(v) for v in vocab_shape)
            if (math.prod(shape) != embedding_dim or math.prod(vocab_shape) < num_embeddings or len(vocab_shape) != len(shape)
                    or len(ranks) != len(shape) + 1):
                raise ValueError(f"vocab_shape {vocab_shape} / shape {shape} / ranks {ranks} do not describe a "
                                 f"{num_embeddings}x{embedding_dim} TT-matrix")
            self.vocab_shape = vocab_shape
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.shape, self.ranks = shape, ranks

    @staticmethod
    def geometry_config(config: dict[str, Any], name: str, matrix: bool) -> dict[str, Any]:
        """The geometry arguments of a saved TT table's config, checked (the TT layers and their quantized forms)."""
        values = {"num_embeddings": config_int(config, "num_embeddings", name), "embedding_dim": config_int(config, "embedding_dim", name)}
        if matrix:
            values["vocab_shape"] = config_int_list(config, "vocab_shape", name)
        return {**values, "shape": config_int_list(config, "shape", name), "ranks": config_int_list(config, "ranks", name),
                "padding_idx": config_int(config, "padding_idx", name, minimum=0, optional=True, default=None),
                "cache_dense": config_bool(config, "cache_dense", name, default=False)}

    def _init_cache(self, cache_dense: bool) -> None:
        self.cache_dense = cache_dense
        self._cached_table: Tensor | None = None

    def clear_cache(self) -> None:
        self._cached_table = None

    def _table_for_logits(self) -> Tensor | None:
        if not self.cache_dense or self.training or torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            # Training (or gradients wanted): a cache would go stale or cut the graph.
            self._cached_table = None
            return None
        if self._cached_table is None:
            with torch.no_grad():
                self._cached_table = self.dense_weight()
        return self._cached_table

    def _logits_chunked(self, hidden: Tensor) -> Tensor:
        table = self._table_for_logits()
        if table is not None:
            return F.linear(hidden, table)
        pieces = []
        for start in range(0, self.num_embeddings, REBUILD_CHUNK):
            ids = torch.arange(start, min(start + REBUILD_CHUNK, self.num_embeddings), device=hidden.device)
            pieces.append(F.linear(hidden, self.rows(ids)))
        return torch.cat(pieces, dim=-1)

    def _load_from_state_dict(self, *args, **kwargs):
        self._cached_table = None
        super()._load_from_state_dict(*args, **kwargs)


@register_layer
class TTEmbedding(_TTTable, FactorizedModule):
    """TensorGPT: each token's d-vector, reshaped to (n_1, ..., n_N), stored as its own tensor train.

    Core k is a parameter (V, R_{k-1}, n_k, R_k), padded to the largest rank any token needed; a token's own
    ranks are in the ``token_ranks`` buffer (zeros fill the padding), which is what the paper's compression
    rate counts. ``stored_parameters()`` counts the padded cores actually held.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, shape: Sequence[int], ranks: Sequence[int],
                 padding_idx: int | None = None, cache_dense: bool = False, dtype=None, device=None):
        super().__init__()
        self._set_geometry(num_embeddings, embedding_dim, shape, ranks, padding_idx)
        shape, ranks = self.shape, self.ranks
        self.cores = nn.ParameterList(
            nn.Parameter(torch.zeros(num_embeddings, ranks[k], n, ranks[k + 1], dtype=dtype, device=device))
            for k, n in enumerate(shape)
        )
        self.register_buffer("token_ranks", torch.ones(num_embeddings, len(shape) + 1, dtype=torch.int16, device=device))
        self._init_cache(cache_dense)

    @classmethod
    def from_trains(cls, trains: BatchedTT, padding_idx: int | None = None, cache_dense: bool = False, dtype=None) -> "TTEmbedding":
        dtype = dtype or trains.cores[0].dtype
        layer = cls(trains.cores[0].shape[0], math.prod(trains.shape), trains.shape, trains.padded_ranks,
                    padding_idx, cache_dense, dtype=dtype, device=trains.cores[0].device)
        with torch.no_grad():
            for parameter, core in zip(layer.cores, trains.cores):
                parameter.copy_(core)
            layer.token_ranks.copy_(trains.ranks)
        return layer

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, shape: Sequence[int], *, max_rank=None, tolerance=None,
                       cache_dense: bool = False) -> "TTEmbedding":
        from lmshrink.decompose.tt import tt_svd_batched

        weight = embedding.weight.detach()
        trains = tt_svd_batched(weight, shape, max_rank=max_rank, tolerance=tolerance)
        return cls.from_trains(trains, embedding.padding_idx, cache_dense, dtype=weight.dtype)

    def rows(self, ids: Tensor) -> Tensor:
        """(B, d) rows for flat ids (B,), contracted from the gathered cores."""
        return tt_reconstruct_batched([core[ids] for core in self.cores])

    def dense_weight(self) -> Tensor:
        return torch.cat([self.rows(torch.arange(s, min(s + REBUILD_CHUNK, self.num_embeddings), device=self.cores[0].device))
                          for s in range(0, self.num_embeddings, REBUILD_CHUNK)])

    def tt_parameters(self) -> int:
        """Parameters of every token's train at its own ranks: the denominator of TensorGPT's compression rate."""
        return int(tt_parameter_counts(self.token_ranks, self.shape).sum())

    def stored_parameters(self) -> int:
        return sum(core.numel() for core in self.cores)

    def layer_config(self) -> dict[str, Any]:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim, "shape": list(self.shape),
                "ranks": list(self.ranks), "padding_idx": self.padding_idx, "cache_dense": self.cache_dense,
                "tt_parameters": self.tt_parameters(), "compression_rate": round(self.compression_rate(), 4)}

    @classmethod
    def from_config(cls, config: dict[str, Any], model: nn.Module) -> "TTEmbedding":
        return cls(**cls.geometry_config(config, cls.__name__, matrix=False))

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, shape={'x'.join(map(str, self.shape))}, "
                f"ranks={self.ranks}, rate={self.compression_rate():.2f}x")


@register_layer
class TTMatrixEmbedding(_TTTable, FactorizedModule):
    """The whole (V, d) table as one TT-matrix: cores (r_{k-1}, v_k, d_k, r_k), V' = prod v_k >= V, d = prod d_k.

    When V has no balanced factorization the table is padded with zero rows up to V' (``vocab_shape``'s
    product); lookups beyond V are refused.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, vocab_shape: Sequence[int], shape: Sequence[int],
                 ranks: Sequence[int], padding_idx: int | None = None, cache_dense: bool = False, dtype=None, device=None):
        super().__init__()
        self._set_geometry(num_embeddings, embedding_dim, shape, ranks, padding_idx, vocab_shape)
        vocab_shape, shape, ranks = self.vocab_shape, self.shape, self.ranks
        self.cores = nn.ParameterList(
            nn.Parameter(torch.zeros(ranks[k], v, n, ranks[k + 1], dtype=dtype, device=device))
            for k, (v, n) in enumerate(zip(vocab_shape, shape))
        )
        self._init_cache(cache_dense)

    @classmethod
    def from_cores(cls, cores: Sequence[Tensor], num_embeddings: int, padding_idx: int | None = None,
                   cache_dense: bool = False, dtype=None) -> "TTMatrixEmbedding":
        vocab_shape = [core.shape[1] for core in cores]
        shape = [core.shape[2] for core in cores]
        ranks = [1] + [core.shape[3] for core in cores]
        layer = cls(num_embeddings, math.prod(shape), vocab_shape, shape, ranks, padding_idx, cache_dense,
                    dtype=dtype or cores[0].dtype, device=cores[0].device)
        with torch.no_grad():
            for parameter, core in zip(layer.cores, cores):
                parameter.copy_(core)
        return layer

    def rows(self, ids: Tensor) -> Tensor:
        return tt_matrix_rows(list(self.cores), ids)

    def dense_weight(self) -> Tensor:
        return tt_matrix_reconstruct(list(self.cores))[: self.num_embeddings]

    def tt_parameters(self) -> int:
        return sum(core.numel() for core in self.cores)

    stored_parameters = tt_parameters

    def layer_config(self) -> dict[str, Any]:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "vocab_shape": list(self.vocab_shape), "shape": list(self.shape), "ranks": list(self.ranks),
                "padding_idx": self.padding_idx, "cache_dense": self.cache_dense,
                "tt_parameters": self.tt_parameters(), "compression_rate": round(self.compression_rate(), 4)}

    @classmethod
    def from_config(cls, config: dict[str, Any], model: nn.Module) -> "TTMatrixEmbedding":
        return cls(**cls.geometry_config(config, cls.__name__, matrix=True))

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, vocab_shape={'x'.join(map(str, self.vocab_shape))}, "
                f"shape={'x'.join(map(str, self.shape))}, ranks={self.ranks}, rate={self.compression_rate():.2f}x")
