"""Quantized storage: packed k-bit integers plus float16 scales, held as buffers so they are saved and counted.

``PackedTensor`` is the storage unit (used by the block low-rank layers for their factors too); ``QuantizedEmbedding``
and ``QuantizedLinear`` replace dense modules by their quantized matrix (the "quantization alone" baseline).
The float matrix is rebuilt once and cached outside the state dict: it is never saved nor counted.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmshrink.decompose.quantize import QuantizedMatrix, dequantize, quantize
from lmshrink.errors import CorruptFile
from lmshrink.layers.base import FactorizedModule, config_bool, config_field, config_int, register_layer
from lmshrink.layers.lowrank import linear_weight


class PackedTensor(nn.Module):
    """A quantized (rows, columns) matrix: buffers ``packed`` (uint8), ``scales`` and ``minimums`` (float16)."""

    def __init__(self, shape: tuple[int, int], bits: int, group_size: int | None = None):
        super().__init__()
        rows, columns = shape
        self.shape, self.bits, self.group_size = (int(rows), int(columns)), int(bits), group_size
        groups = 1 if group_size is None else -(-columns // group_size)
        self.register_buffer("packed", torch.zeros(-(-rows * columns * bits // 8), dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(rows, groups, dtype=torch.float16))
        self.register_buffer("minimums", torch.zeros(rows, groups, dtype=torch.float16))
        self._cache: Tensor | None = None
        self.register_load_state_dict_post_hook(lambda module, keys: module.clear_cache())

    @classmethod
    def from_tensor(cls, matrix: Tensor, bits: int, group_size: int | None = None) -> "PackedTensor":
        return cls.from_quantized(quantize(matrix, bits, group_size))

    @classmethod
    def from_quantized(cls, quantized: QuantizedMatrix) -> "PackedTensor":
        packed = cls(quantized.shape, quantized.bits, quantized.group_size)
        packed.packed, packed.scales, packed.minimums = quantized.packed, quantized.scales, quantized.minimums
        return packed

    @property
    def stored_values(self) -> int:
        """How many matrix entries the packed integers hold (accounting.count_params counts them as parameters)."""
        return self.shape[0] * self.shape[1]

    def clear_cache(self) -> None:
        self._cache = None

    def value(self) -> Tensor:
        """The dequantized float32 matrix (computed once, then cached)."""
        if self._cache is None:
            self._cache = self.dequantized()
        return self._cache

    def dequantized(self) -> Tensor:
        """The dequantized float32 matrix, computed now and not kept (for a layer that caches what it builds of it)."""
        return dequantize(QuantizedMatrix(self.packed, self.scales, self.minimums, self.shape, self.bits, self.group_size))

    def config(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "bits": self.bits, "group_size": self.group_size}

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "PackedTensor":
        return cls(tuple(config["shape"]), config["bits"], config["group_size"])

    def _apply(self, fn, *args, **kwargs):
        self.clear_cache()  # moved or cast: rebuild on next use
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.shape[0]}x{self.shape[1]}, bits={self.bits}, group_size={self.group_size or 'row'}"


def config_bits(config: Any, layer: str, optional: bool = False) -> int | None:
    """The ``bits`` of a layer config: one of the supported widths (or null when ``optional``)."""
    from lmshrink.decompose.quantize import SUPPORTED_BITS

    bits = config_field(config, "bits", layer)
    if bits is None and optional:
        return None
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise CorruptFile(f"{layer} config 'bits' is {bits!r}; allowed: one of {SUPPORTED_BITS}" + (" or null" if optional else ""))
    return bits


def _check_ids(ids: Tensor, vocab: int) -> None:
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise IndexError(f"token ids must lie in [0, {vocab}); got [{int(ids.min())}, {int(ids.max())}]")


@register_layer
class QuantizedEmbedding(FactorizedModule):
    """A (V, d) embedding stored as k-bit integers per row (or column group); ``logits`` serves a tied head."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, group_size: int | None = None,
                 padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.weight_q = PackedTensor((num_embeddings, embedding_dim), bits, group_size)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, bits: int, group_size: int | None = None,
                       quantized: QuantizedMatrix | None = None) -> "QuantizedEmbedding":
        """``embedding`` quantized to ``bits`` (round to nearest), or holding ``quantized`` (its table quantized elsewhere)."""
        weight = embedding.weight.detach()
        quantized = quantized if quantized is not None else quantize(weight, bits, group_size)
        layer = cls(weight.shape[0], weight.shape[1], quantized.bits, quantized.group_size, embedding.padding_idx)
        layer.weight_q = PackedTensor.from_quantized(quantized)
        return layer

    def forward(self, ids: Tensor) -> Tensor:
        _check_ids(ids, self.num_embeddings)
        return F.embedding(ids, self.weight_q.value())

    def logits(self, hidden: Tensor) -> Tensor:
        return F.linear(hidden, self.weight_q.value().to(hidden.dtype))

    def dense_weight(self) -> Tensor:
        return self.weight_q.value()

    def layer_config(self) -> dict[str, Any]:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim, "padding_idx": self.padding_idx,
                **{k: v for k, v in self.weight_q.config().items() if k != "shape"}}

    @classmethod
    def from_config(cls, config: dict[str, Any], model: nn.Module) -> "QuantizedEmbedding":
        name = cls.__name__
        return cls(config_int(config, "num_embeddings", name), config_int(config, "embedding_dim", name),
                   config_bits(config, name), config_int(config, "group_size", name, optional=True),
                   config_int(config, "padding_idx", name, minimum=0, optional=True))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.weight_q.bits}"


@register_layer
class MixedBitsEmbedding(FactorizedModule):
    """A (V, d) embedding whose rows are stored at one of two widths: most at ``bits``, the ``rare`` ones (a bool per
    row, saved and counted) at ``rare_bits``, each set packed in id order; ``logits`` serves a tied head.

    For vocabularies most of whose rows a text never reads (Gemma 3's 262,144 tokens on English prose): the bits
    those rows give up pay for the rest of the model.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, rare_bits: int, rare_rows: int,
                 group_size: int | None = None, padding_idx: int | None = None):
        super().__init__()
        if not 0 <= rare_rows <= num_embeddings:
            raise ValueError(f"rare_rows must lie in [0, {num_embeddings}], got {rare_rows}")
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.register_buffer("rare", torch.zeros(num_embeddings, dtype=torch.bool))
        self.common_q = PackedTensor((num_embeddings - rare_rows, embedding_dim), bits, group_size)
        self.rare_q = PackedTensor((rare_rows, embedding_dim), rare_bits, group_size)
        self._cache: Tensor | None = None
        self.register_load_state_dict_post_hook(lambda module, keys: module.clear_cache())

    @classmethod
    def from_parts(cls, embedding: nn.Embedding, rare: Tensor, common: QuantizedMatrix, rare_part: QuantizedMatrix
                   ) -> "MixedBitsEmbedding":
        """``embedding`` held as ``common`` (its rows where ``rare`` is False, in id order) and ``rare_part`` (the others)."""
        vocab, dim = embedding.weight.shape
        layer = cls(vocab, dim, common.bits, rare_part.bits, int(rare.sum()), common.group_size, embedding.padding_idx)
        layer.rare = rare.to(torch.bool).clone()
        layer.common_q, layer.rare_q = PackedTensor.from_quantized(common), PackedTensor.from_quantized(rare_part)
        return layer

    def clear_cache(self) -> None:
        self._cache = None

    def _apply(self, fn, *args, **kwargs):
        self.clear_cache()
        return super()._apply(fn, *args, **kwargs)

    def dense_weight(self) -> Tensor:
        """The float32 table (built once from both parts, then cached)."""
        if self._cache is None:
            rows = int(self.rare.sum())
            if rows != self.rare_q.shape[0]:  # a file whose mask disagrees with its parts: refuse rather than misplace rows
                raise CorruptFile(f"MixedBitsEmbedding marks {rows} rows rare but stores {self.rare_q.shape[0]}")
            table = torch.empty(self.num_embeddings, self.embedding_dim, device=self.rare.device)
            table[~self.rare] = self.common_q.dequantized()
            table[self.rare] = self.rare_q.dequantized()
            self._cache = table
        return self._cache

    def forward(self, ids: Tensor) -> Tensor:
        _check_ids(ids, self.num_embeddings)
        return F.embedding(ids, self.dense_weight())

    def logits(self, hidden: Tensor) -> Tensor:
        return F.linear(hidden, self.dense_weight().to(hidden.dtype))

    def layer_config(self) -> dict[str, Any]:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim, "padding_idx": self.padding_idx,
                "bits": self.common_q.bits, "rare_bits": self.rare_q.bits, "rare_rows": self.rare_q.shape[0],
                "group_size": self.common_q.group_size}

    @classmethod
    def from_config(cls, config: dict[str, Any], model: nn.Module) -> "MixedBitsEmbedding":
        name = cls.__name__
        vocab, rare_rows = config_int(config, "num_embeddings", name), config_int(config, "rare_rows", name)
        if rare_rows >= vocab:
            raise CorruptFile(f"{name} config 'rare_rows' is {rare_rows}; allowed: fewer than num_embeddings ({vocab})")
        return cls(vocab, config_int(config, "embedding_dim", name), config_bits(config, name),
                   config_bits({"bits": config_field(config, "rare_bits", name)}, name + " rare_bits"), rare_rows,
                   config_int(config, "group_size", name, optional=True),
                   config_int(config, "padding_idx", name, minimum=0, optional=True))

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, bits={self.common_q.bits}, "
                f"rare_bits={self.rare_q.bits} on {self.rare_q.shape[0]} rows")


@register_layer
class QuantizedLinear(FactorizedModule):
    """y = x W^T + b with W (out, in) stored as k-bit integers; the bias stays float."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None = None, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_q = PackedTensor((out_features, in_features), bits, group_size)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Module, bits: int, group_size: int | None = None,
                    quantized: QuantizedMatrix | None = None) -> "QuantizedLinear":
        """``linear`` quantized to ``bits`` (round to nearest), or holding ``quantized`` (its weight quantized elsewhere,
        e.g. by ``quantize_compensated``) with ``linear``'s bias."""
        weight = linear_weight(linear).detach()
        quantized = quantized if quantized is not None else quantize(weight, bits, group_size)
        layer = cls(weight.shape[1], weight.shape[0], quantized.bits, quantized.group_size, linear.bias is not None)
        layer.weight_q = PackedTensor.from_quantized(quantized)
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias.detach().float())
        return layer

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight_q.value().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def dense_weight(self) -> Tensor:
        return self.weight_q.value()

    def layer_config(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                **{k: v for k, v in self.weight_q.config().items() if k != "shape"}}

    @classmethod
    def from_config(cls, config: dict[str, Any], model: nn.Module) -> "QuantizedLinear":
        name = cls.__name__
        return cls(config_int(config, "in_features", name), config_int(config, "out_features", name), config_bits(config, name),
                   config_int(config, "group_size", name, optional=True), config_bool(config, "bias", name))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.weight_q.bits}"
