"""Low-rank layers: W ~ left @ right stored as two factors, applied as two thin matmuls."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmshrink.decompose.svd import truncated_svd
from lmshrink.layers.base import FactorizedModule, config_bool, config_field, config_int, register_layer


def linear_weight(module: nn.Module) -> Tensor:
    """The (out, in) weight of nn.Linear or of GPT-2's Conv1D (which stores (in, out))."""
    if isinstance(module, nn.Linear):
        return module.weight
    if type(module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D, matched by name to avoid the import
        return module.weight.T
    raise TypeError(f"expected nn.Linear or Conv1D, got {type(module).__name__}")


@register_layer
class LowRankLinear(FactorizedModule):
    """y = (x @ right.T) @ left.T + bias, with left (out, k) and right (k, in)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.right = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))
        self.left = nn.Parameter(torch.empty(out_features, rank, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_factors(cls, left: Tensor, right: Tensor, bias: Tensor | None = None, dtype=None) -> "LowRankLinear":
        dtype = dtype or left.dtype
        layer = cls(right.shape[1], left.shape[0], left.shape[1], bias is not None, dtype=dtype, device=left.device)
        with torch.no_grad():
            layer.left.copy_(left)
            layer.right.copy_(right)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Module, rank: int, factors: tuple[Tensor, Tensor] | None = None) -> "LowRankLinear":
        """Factorize an nn.Linear (or Conv1D) with truncated SVD, or wrap given (left, right) factors."""
        weight = linear_weight(linear).detach()
        left, right = factors if factors is not None else truncated_svd(weight, rank)
        return cls.from_factors(left, right, None if linear.bias is None else linear.bias.detach(), dtype=weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.right), self.left, self.bias)

    def dense_weight(self) -> Tensor:
        return self.left @ self.right

    def layer_config(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "rank": self.rank,
                "bias": self.bias is not None}

    @classmethod
    def from_config(cls, config: dict[str, Any], model: nn.Module) -> "LowRankLinear":
        name = cls.__name__
        return cls(config_int(config, "in_features", name), config_int(config, "out_features", name),
                   config_int(config, "rank", name), config_bool(config, "bias", name))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.bias is not None}"


@register_layer
class LowRankEmbedding(FactorizedModule):
    """E ~ left @ right with left (V, k) per-token codes and right (k, d) a shared basis."""

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int, padding_idx: int | None = None, dtype=None, device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.rank, self.padding_idx = num_embeddings, embedding_dim, rank, padding_idx
        self.left = nn.Parameter(torch.empty(num_embeddings, rank, dtype=dtype, device=device))
        self.right = nn.Parameter(torch.empty(rank, embedding_dim, dtype=dtype, device=device))

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, rank: int, factors: tuple[Tensor, Tensor] | None = None) -> "LowRankEmbedding":
        weight = embedding.weight.detach()
        left, right = factors if factors is not None else truncated_svd(weight, rank)
        layer = cls(weight.shape[0], weight.shape[1], left.shape[1], embedding.padding_idx, dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            layer.left.copy_(left)
            layer.right.copy_(right)
        return layer

    def forward(self, ids: Tensor) -> Tensor:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_embeddings):
            raise IndexError(f"token ids must lie in [0, {self.num_embeddings}); got [{int(ids.min())}, {int(ids.max())}]")
        return F.embedding(ids, self.left) @ self.right

    def logits(self, hidden: Tensor) -> Tensor:
        """hidden @ E.T through the factors: what a tied output layer computes."""
        return F.linear(F.linear(hidden, self.right), self.left)

    def dense_weight(self) -> Tensor:
        return self.left @ self.right

    def layer_config(self) -> dict[str, Any]:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim, "rank": self.rank,
                "padding_idx": self.padding_idx}

    @classmethod
    def from_config(cls, config: dict[str, Any], model: nn.Module) -> "LowRankEmbedding":
        name = cls.__name__
        return cls(config_int(config, "num_embeddings", name), config_int(config, "embedding_dim", name),
                   config_int(config, "rank", name), config_int(config, "padding_idx", name, minimum=0, optional=True))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}"


@register_layer
class TiedHead(FactorizedModule):
    """An output layer that shares a factorized embedding's parameters (tied input/output embeddings).

    The embedding is held by reference, not registered as a child, so its parameters are stored
    and counted once. Works with any embedding layer that has ``logits(hidden)``.
    """

    def __init__(self, embedding: nn.Module, embedding_name: str, bias: Tensor | None = None):
        super().__init__()
        object.__setattr__(self, "embedding", embedding)  # a reference, not a submodule
        self.embedding_name = embedding_name
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    def forward(self, hidden: Tensor) -> Tensor:
        logits = self.embedding.logits(hidden)
        return logits if self.bias is None else logits + self.bias

    def dense_weight(self) -> Tensor:
        return self.embedding.dense_weight()

    def layer_config(self) -> dict[str, Any]:
        return {"embedding": self.embedding_name, "bias": self.bias is not None,
                "vocab_size": getattr(self.embedding, "num_embeddings", None)}

    @classmethod
    def from_config(cls, config: dict[str, Any], model: nn.Module) -> "TiedHead":
        from lmshrink.errors import CorruptFile

        name = cls.__name__
        embedding_name = config_field(config, "embedding", name)
        try:
            embedding = model.get_submodule(embedding_name) if isinstance(embedding_name, str) and embedding_name else None
        except AttributeError:
            embedding = None
        # Only a factorized embedding already in place can serve as a tied head (it computes logits through its factors).
        if not isinstance(embedding, FactorizedModule) or not hasattr(embedding, "logits"):
            raise CorruptFile(f"{name} config 'embedding' is {embedding_name!r}; allowed: the name of a factorized embedding "
                              "listed before the head")
        bias = config_bool(config, "bias", name)
        vocab_size = config_int(config, "vocab_size", name, optional=not bias)
        return cls(embedding, embedding_name, torch.zeros(vocab_size) if bias else None)

    def extra_repr(self) -> str:
        return f"tied to {self.embedding_name}"
