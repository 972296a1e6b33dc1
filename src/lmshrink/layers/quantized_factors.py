"""Factorized layers whose factors are stored as k-bit packed integers (``Plan.bits``).

Each mirrors a float layer (LowRankLinear, LowRankEmbedding, TTEmbedding, TTMatrixEmbedding, ChannelLinear) with every factor held
as a ``PackedTensor`` (packed integers + float16 scale and minimum per row or column group): buffers, so they are
saved and counted exactly. Block low-rank (GroupReduce) tables quantize in place (their ``bits``), and a tied output
layer stays a ``TiedHead`` over the quantized embedding. Factors are dequantized once and cached outside the state dict.
Linear layers given their input Gram round their factors by GPTQ's error compensation (``_packed``), else to nearest.
Tensor-train cores (V, R, n, R') / (r, v, n, r') are quantized as 2-D matrices, one row per token (or per r x v slice).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmshrink.decompose.quantize import quantize_compensated
from lmshrink.decompose.tt import tt_matrix_reconstruct, tt_matrix_rows, tt_parameter_counts, tt_reconstruct_batched
from lmshrink.layers.base import FactorizedModule, config_bool, config_field, config_int, register_layer
from lmshrink.layers.channels import check_channels, scatter_channels
from lmshrink.layers.quantized import PackedTensor, config_bits
from lmshrink.layers.tt import REBUILD_CHUNK, _TTTable


def _bits_repr(layer) -> str:
    return f"bits={layer.bits}, group_size={layer.group_size or 'row'}"


def _quant_config(config: dict[str, Any], layer: str) -> tuple[int, int | None]:
    return config_bits(config, layer), config_int(config, "group_size", layer, optional=True)


def _packed(matrix: Tensor, bits: int, group_size: int | None, input_gram: Tensor | None) -> PackedTensor:
    # With the Gram of what the matrix multiplies, each rounding error is spread over the columns not yet rounded.
    if input_gram is None:
        return PackedTensor.from_tensor(matrix, bits, group_size)
    return PackedTensor.from_quantized(quantize_compensated(matrix, bits, group_size, input_gram.to(matrix.device)))


@register_layer
class QuantizedLowRankLinear(FactorizedModule):
    """y = (x @ right.T) @ left.T + bias with left (out, k) and right (k, in) stored as k-bit integers; bias float."""

    def __init__(self, in_features: int, out_features: int, rank: int, bits: int, group_size: int | None = None,
                 bias: bool = True, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.bits, self.group_size = bits, group_size  # as asked (each PackedTensor clamps the group to its own columns)
        self.left_q = PackedTensor((out_features, rank), bits, group_size)
        self.right_q = PackedTensor((rank, in_features), bits, group_size)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    @classmethod
    def from_lowrank(cls, layer, bits: int, group_size: int | None = None,
                     input_gram: Tensor | None = None) -> "QuantizedLowRankLinear":
        """``input_gram``: of the layer's input; the left factor is then rounded on what the rounded right one gives."""
        new = cls(layer.in_features, layer.out_features, layer.rank, bits, group_size, layer.bias is not None,
                  dtype=layer.left.dtype)
        new.right_q = _packed(layer.right.detach(), bits, group_size, input_gram)
        if input_gram is not None:
            right = new.right_q.value().double().to(input_gram.device)
            input_gram = right @ input_gram.double() @ right.T
        new.left_q = _packed(layer.left.detach(), bits, group_size, input_gram)
        if layer.bias is not None:
            with torch.no_grad():
                new.bias.copy_(layer.bias.detach())
        return new

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.right_q.value().to(x.dtype)), self.left_q.value().to(x.dtype),
                        None if self.bias is None else self.bias.to(x.dtype))

    def dense_weight(self) -> Tensor:
        return self.left_q.value() @ self.right_q.value()

    def layer_config(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "rank": self.rank,
                "bias": self.bias is not None, "bits": self.bits, "group_size": self.group_size}

    @classmethod
    def from_config(cls, config: dict[str, Any], model: nn.Module) -> "QuantizedLowRankLinear":
        name = cls.__name__
        bits, group_size = _quant_config(config, name)
        return cls(config_int(config, "in_features", name), config_int(config, "out_features", name),
                   config_int(config, "rank", name), bits, group_size, config_bool(config, "bias", name))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, {_bits_repr(self)}"


@register_layer
class QuantizedLowRankEmbedding(FactorizedModule):
    """E ~ left (V, k) @ right (k, d), both k-bit integers; ``logits`` serves a tied output layer (TiedHead)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int, bits: int, group_size: int | None = None,
                 padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.rank, self.padding_idx = num_embeddings, embedding_dim, rank, padding_idx
        self.bits, self.group_size = bits, group_size
        self.left_q = PackedTensor((num_embeddings, rank), bits, group_size)
        self.right_q = PackedTensor((rank, embedding_dim), bits, group_size)

    @classmethod
    def from_lowrank(cls, layer, bits: int, group_size: int | None = None) -> "QuantizedLowRankEmbedding":
        new = cls(layer.num_embeddings, layer.embedding_dim, layer.rank, bits, group_size, layer.padding_idx)
        new.left_q = PackedTensor.from_tensor(layer.left.detach(), bits, group_size)
        new.right_q = PackedTensor.from_tensor(layer.right.detach(), bits, group_size)
        return new

    def forward(self, ids: Tensor) -> Tensor:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_embeddings):
            raise IndexError(f"token ids must lie in [0, {self.num_embeddings}); got [{int(ids.min())}, {int(ids.max())}]")
        return F.embedding(ids, self.left_q.value()) @ self.right_q.value()

    def logits(self, hidden: Tensor) -> Tensor:
        return F.linear(F.linear(hidden, self.right_q.value().to(hidden.dtype)), self.left_q.value().to(hidden.dtype))

    def dense_weight(self) -> Tensor:
        return self.left_q.value() @ self.right_q.value()

    def layer_config(self) -> dict[str, Any]:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim, "rank": self.rank,
                "padding_idx": self.padding_idx, "bits": self.bits, "group_size": self.group_size}

    @classmethod
    def from_config(cls, config: dict[str, Any], model: nn.Module) -> "QuantizedLowRankEmbedding":
        name = cls.__name__
        bits, group_size = _quant_config(config, name)
        return cls(config_int(config, "num_embeddings", name), config_int(config, "embedding_dim", name),
                   config_int(config, "rank", name), bits, group_size,
                   config_int(config, "padding_idx", name, minimum=0, optional=True))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}, {_bits_repr(self)}"


@register_layer
class QuantizedTTEmbedding(_TTTable, FactorizedModule):
    """TTEmbedding (TensorGPT, one train per token) with every core (V, R, n, R') stored as k-bit integers,
    quantized as a (V, R n R') matrix: one token's core slice per row."""

    def __init__(self, num_embeddings: int, embedding_dim: int, shape: Sequence[int], ranks: Sequence[int], bits: int,
                 group_size: int | None = None, padding_idx: int | None = None, cache_dense: bool = False):
        super().__init__()
        self._set_geometry(num_embeddings, embedding_dim, shape, ranks, padding_idx)
        shape, ranks = self.shape, self.ranks
        self.bits, self.group_size = bits, group_size
        self.cores_q = nn.ModuleList(PackedTensor((num_embeddings, ranks[k] * n * ranks[k + 1]), bits, group_size)
                                     for k, n in enumerate(shape))
        self.register_buffer("token_ranks", torch.ones(num_embeddings, len(shape) + 1, dtype=torch.int16))
        self._init_cache(cache_dense)

    @classmethod
    def from_tt(cls, layer, bits: int, group_size: int | None = None) -> "QuantizedTTEmbedding":
        new = cls(layer.num_embeddings, layer.embedding_dim, layer.shape, layer.ranks, bits, group_size,
                  layer.padding_idx, layer.cache_dense)
        for k, core in enumerate(layer.cores):
            new.cores_q[k] = PackedTensor.from_tensor(core.detach().reshape(core.shape[0], -1), bits, group_size)
        new.token_ranks.copy_(layer.token_ranks)
        return new

    def cores(self) -> list[Tensor]:
        return [packed.value().view(self.num_embeddings, self.ranks[k], n, self.ranks[k + 1])
                for k, (packed, n) in enumerate(zip(self.cores_q, self.shape))]

    def rows(self, ids: Tensor) -> Tensor:
        return tt_reconstruct_batched([core[ids] for core in self.cores()])

    def dense_weight(self) -> Tensor:
        return torch.cat([self.rows(torch.arange(s, min(s + REBUILD_CHUNK, self.num_embeddings)))
                          for s in range(0, self.num_embeddings, REBUILD_CHUNK)])

    def tt_parameters(self) -> int:
        return int(tt_parameter_counts(self.token_ranks, self.shape).sum())

    def layer_config(self) -> dict[str, Any]:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim, "shape": list(self.shape),
                "ranks": list(self.ranks), "padding_idx": self.padding_idx, "cache_dense": self.cache_dense,
                "bits": self.bits, "group_size": self.group_size}

    @classmethod
    def from_config(cls, config: dict[str, Any], model: nn.Module) -> "QuantizedTTEmbedding":
        bits, group_size = _quant_config(config, cls.__name__)
        return cls(**cls.geometry_config(config, cls.__name__, matrix=False), bits=bits, group_size=group_size)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, shape={'x'.join(map(str, self.shape))}, ranks={self.ranks}, "
                f"{_bits_repr(self)}")


@register_layer
class QuantizedTTMatrixEmbedding(_TTTable, FactorizedModule):
    """TTMatrixEmbedding with every core (r, v, n, r') stored as k-bit integers, quantized as an (r v, n r') matrix."""

    def __init__(self, num_embeddings: int, embedding_dim: int, vocab_shape: Sequence[int], shape: Sequence[int],
                 ranks: Sequence[int], bits: int, group_size: int | None = None, padding_idx: int | None = None,
                 cache_dense: bool = False):
        super().__init__()
        self._set_geometry(num_embeddings, embedding_dim, shape, ranks, padding_idx, vocab_shape)
        vocab_shape, shape, ranks = self.vocab_shape, self.shape, self.ranks
        self.bits, self.group_size = bits, group_size
        self.cores_q = nn.ModuleList(PackedTensor((ranks[k] * v, n * ranks[k + 1]), bits, group_size)
                                     for k, (v, n) in enumerate(zip(vocab_shape, shape)))
        self._init_cache(cache_dense)

    @classmethod
    def from_tt(cls, layer, bits: int, group_size: int | None = None) -> "QuantizedTTMatrixEmbedding":
        new = cls(layer.num_embeddings, layer.embedding_dim, layer.vocab_shape, layer.shape, layer.ranks, bits, group_size,
                  layer.padding_idx, layer.cache_dense)
        for k, core in enumerate(layer.cores):
            new.cores_q[k] = PackedTensor.from_tensor(core.detach().reshape(core.shape[0] * core.shape[1], -1), bits, group_size)
        return new

    def cores(self) -> list[Tensor]:
        return [packed.value().view(self.ranks[k], v, n, self.ranks[k + 1])
                for k, (packed, v, n) in enumerate(zip(self.cores_q, self.vocab_shape, self.shape))]

    def rows(self, ids: Tensor) -> Tensor:
        return tt_matrix_rows(self.cores(), ids)

    def dense_weight(self) -> Tensor:
        return tt_matrix_reconstruct(self.cores())[: self.num_embeddings]

    def tt_parameters(self) -> int:
        return sum(math.prod(packed.shape) for packed in self.cores_q)

    def layer_config(self) -> dict[str, Any]:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "vocab_shape": list(self.vocab_shape), "shape": list(self.shape), "ranks": list(self.ranks),
                "padding_idx": self.padding_idx, "cache_dense": self.cache_dense,
                "bits": self.bits, "group_size": self.group_size}

    @classmethod
    def from_config(cls, config: dict[str, Any], model: nn.Module) -> "QuantizedTTMatrixEmbedding":
        bits, group_size = _quant_config(config, cls.__name__)
        return cls(**cls.geometry_config(config, cls.__name__, matrix=True), bits=bits, group_size=group_size)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, vocab_shape={'x'.join(map(str, self.vocab_shape))}, "
                f"shape={'x'.join(map(str, self.shape))}, ranks={self.ranks}, {_bits_repr(self)}")


@register_layer
class QuantizedChannelLinear(FactorizedModule):
    """A ChannelLinear (the kept rows or columns of a dense matrix, lmshrink.methods.nystrom) whose narrowed weight
    is stored as k-bit integers; ``kept`` (int32) and the bias stay as they are."""

    def __init__(self, in_features: int, out_features: int, side: str, dense_features: int, bits: int,
                 group_size: int | None = None, bias: bool = False, dtype=None):
        super().__init__()
        kept = check_channels(type(self).__name__, in_features, out_features, side, dense_features)
        self.in_features, self.out_features, self.side, self.dense_features = in_features, out_features, side, dense_features
        self.bits, self.group_size = bits, group_size
        self.weight_q = PackedTensor((out_features, in_features), bits, group_size)
        self.register_buffer("kept", torch.zeros(kept, dtype=torch.int32))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    @classmethod
    def from_channels(cls, layer, bits: int, group_size: int | None = None,
                      input_gram: Tensor | None = None) -> "QuantizedChannelLinear":
        """``input_gram``: of the dense layer's input (a consumer reads only its kept channels of it)."""
        new = cls(layer.in_features, layer.out_features, layer.side, layer.dense_features, bits, group_size,
                  layer.bias is not None, dtype=layer.weight.dtype)
        if input_gram is not None and layer.side == "columns":
            kept = layer.kept.long().to(input_gram.device)
            input_gram = input_gram[kept][:, kept]
        new.weight_q = _packed(layer.weight.detach(), bits, group_size, input_gram)
        with torch.no_grad():
            new.kept.copy_(layer.kept)
            if layer.bias is not None:
                new.bias.copy_(layer.bias.detach())
        return new.to(layer.kept.device)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight_q.value().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def dense_weight(self) -> Tensor:
        return scatter_channels(self.weight_q.value(), self.kept, self.side, self.dense_features)

    def layer_config(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "side": self.side,
                "dense_features": self.dense_features, "bias": self.bias is not None, "bits": self.bits,
                "group_size": self.group_size}

    @classmethod
    def from_config(cls, config: dict[str, Any], model: nn.Module) -> "QuantizedChannelLinear":
        name = cls.__name__
        bits, group_size = _quant_config(config, name)
        return cls(config_int(config, "in_features", name), config_int(config, "out_features", name),
                   config_field(config, "side", name), config_int(config, "dense_features", name), bits, group_size,
                   config_bool(config, "bias", name))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.side} kept of "
                f"{self.dense_features}, {_bits_repr(self)}")
