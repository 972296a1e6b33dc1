"""LSTM whose gate matrices are swappable modules, and the pruned-matrix layer.

``FactorizedLSTM`` is a multi-layer LSTM (PyTorch gate order i, f, g, o) that keeps, per layer, its
input-to-hidden matrix W_i (4h x in) and hidden-to-hidden matrix W_h (4h x h) as linear submodules
``ih_l{k}`` / ``hh_l{k}``. While they are plain ``nn.Linear`` it runs PyTorch's fused LSTM kernel (the
same code as ``nn.LSTM``). Once any is replaced (``LowRankLinear``, ``PrunedLinear``, ...) it runs its own
recurrence: the input projections of the whole sequence are computed in one batched matmul before the
time loop, and a low-rank W_h = left @ right costs h*k + k*4h per step (``h @ right.T @ left.T``) instead
of 4h*h. The loop is compiled with TorchScript when available, which removes Python overhead per step.

Its state dict loads from ``nn.LSTM``'s keys (``weight_ih_l0`` ...) too, so checkpoints of the PyTorch
word_language_model example load unchanged.
"""

from __future__ import annotations

import math
from typing import Any, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmshrink.layers.base import FactorizedModule, config_bool, config_int, register_layer
from lmshrink.layers.lowrank import LowRankLinear


@register_layer
class PrunedLinear(FactorizedModule):
    """A linear map whose weight keeps only some entries: stored as ``values`` (nnz) + flat ``indices`` (int32).

    Storage is what a sparse format costs: nnz values (trainable) plus nnz 32-bit positions. The forward pass
    scatters them into a dense matrix and multiplies densely: on CPU, at the densities that matter here
    (>= 5%), a dense matmul with zeros is faster than a sparse kernel, so pruning saves memory, not time.
    """

    def __init__(self, in_features: int, out_features: int, nnz: int, bias: bool = False, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.nnz = in_features, out_features, nnz
        self.values = nn.Parameter(torch.zeros(nnz, dtype=dtype, device=device))
        self.register_buffer("indices", torch.zeros(nnz, dtype=torch.int32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_weight(cls, weight: Tensor, mask: Tensor, bias: Tensor | None = None) -> "PrunedLinear":
        flat = mask.reshape(-1).nonzero()[:, 0]
        layer = cls(weight.shape[1], weight.shape[0], flat.numel(), bias is not None, dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            layer.values.copy_(weight.detach().reshape(-1)[flat])
            layer.indices.copy_(flat.to(torch.int32))
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def dense_weight(self) -> Tensor:
        dense = torch.zeros(self.out_features * self.in_features, dtype=self.values.dtype, device=self.values.device)
        # index_put (not in-place on a leaf) keeps the values differentiable for fine-tuning.
        dense = dense.index_put((self.indices.long(),), self.values)
        return dense.view(self.out_features, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dense_weight(), self.bias)

    def layer_config(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "nnz": self.nnz,
                "bias": self.bias is not None}

    @classmethod
    def from_config(cls, config: dict[str, Any], model: nn.Module) -> "PrunedLinear":
        name = cls.__name__
        return cls(config_int(config, "in_features", name), config_int(config, "out_features", name),
                   config_int(config, "nnz", name, minimum=0), config_bool(config, "bias", name))

    def extra_repr(self) -> str:
        density = self.nnz / (self.in_features * self.out_features)
        return f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.nnz} ({density:.1%})"


def _cell(gates: Tensor, c: Tensor, size: int) -> Tuple[Tensor, Tensor]:
    """One LSTM step from its pre-activations (B, 4h), gates in nn.LSTM's order i, f, g, o: (h, c)."""
    squashed = torch.sigmoid(gates)
    candidate = torch.tanh(gates[:, 2 * size:3 * size])
    c = squashed[:, size:2 * size] * c + squashed[:, :size] * candidate
    return squashed[:, 3 * size:] * torch.tanh(c), c


# The recurrences, as free functions so TorchScript can compile them (it compiles _cell along with them). ``igates`` (T, B, 4h) already holds
# x_t @ W_i^T + b_i + b_h for every step; only the hidden-to-hidden product remains inside the loop.
def _recurrence_dense(igates: Tensor, h: Tensor, c: Tensor, w_hh_t: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    outputs: List[Tensor] = []
    size = h.shape[1]
    for step in range(igates.shape[0]):
        h, c = _cell(torch.addmm(igates[step], h, w_hh_t), c, size)
        outputs.append(h)
    return torch.stack(outputs), h, c


def _recurrence_lowrank(igates: Tensor, h: Tensor, c: Tensor, right_t: Tensor, left_t: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    outputs: List[Tensor] = []
    size = h.shape[1]
    for step in range(igates.shape[0]):
        h, c = _cell(torch.addmm(igates[step], torch.mm(h, right_t), left_t), c, size)
        outputs.append(h)
    return torch.stack(outputs), h, c


def _script(function):
    # TorchScript is deprecated in recent PyTorch; if it is gone or fails, the plain Python loop is used.
    try:
        return torch.jit.script(function)
    except Exception:  # noqa: BLE001 - any failure means "not available here"
        return function


_SCRIPTED: dict[str, Any] = {}


def _compiled(name: str):
    if name not in _SCRIPTED:
        _SCRIPTED[name] = _script({"dense": _recurrence_dense, "lowrank": _recurrence_lowrank}[name])
    return _SCRIPTED[name]


def _recurrence_generic(igates: Tensor, h: Tensor, c: Tensor, hidden_map: nn.Module) -> Tuple[Tensor, Tensor, Tensor]:
    # Any module mapping (B, h) -> (B, 4h): the fallback for layer types with no specialised loop.
    outputs = []
    size = h.shape[1]
    for step in range(igates.shape[0]):
        h, c = _cell(igates[step] + hidden_map(h), c, size)
        outputs.append(h)
    return torch.stack(outputs), h, c


class FactorizedLSTM(nn.Module):
    """Multi-layer LSTM (seq-first, like ``nn.LSTM``) with W_i and W_h as replaceable linear submodules.

    Parameters per layer k: ``ih_l{k}`` (in -> 4h), ``hh_l{k}`` (h -> 4h), ``bias_ih_l{k}``, ``bias_hh_l{k}``.
    ``forward(input (T, B, in), (h0, c0) or None) -> (output (T, B, h), (h_n, c_n))``.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, dropout: float = 0.0,
                 dtype=None, device=None):
        super().__init__()
        self.input_size, self.hidden_size, self.num_layers, self.dropout = input_size, hidden_size, num_layers, dropout
        bound = 1 / math.sqrt(hidden_size)
        for layer in range(num_layers):
            width = input_size if layer == 0 else hidden_size
            setattr(self, f"ih_l{layer}", nn.Linear(width, 4 * hidden_size, bias=False, dtype=dtype, device=device))
            setattr(self, f"hh_l{layer}", nn.Linear(hidden_size, 4 * hidden_size, bias=False, dtype=dtype, device=device))
            self.register_parameter(f"bias_ih_l{layer}", nn.Parameter(torch.empty(4 * hidden_size, dtype=dtype, device=device)))
            self.register_parameter(f"bias_hh_l{layer}", nn.Parameter(torch.empty(4 * hidden_size, dtype=dtype, device=device)))
        # nn.LSTM's initialisation: every weight and bias uniform in +-1/sqrt(h).
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.uniform_(-bound, bound)
        self._register_load_state_dict_pre_hook(self._accept_nn_lstm_keys)

    @staticmethod
    def _accept_nn_lstm_keys(state_dict, prefix, *args, **kwargs):
        # nn.LSTM stores "weight_ih_l0"; here that matrix is the submodule "ih_l0". Rename in place.
        for key in list(state_dict):
            if not key.startswith(prefix):
                continue
            local = key[len(prefix):]
            for kind in ("ih", "hh"):
                if local.startswith(f"weight_{kind}_l") and local[len(f"weight_{kind}_l"):].isdigit():
                    state_dict[f"{prefix}{kind}_l{local[len(f'weight_{kind}_l'):]}.weight"] = state_dict.pop(key)

    @classmethod
    def from_lstm(cls, lstm: nn.LSTM) -> "FactorizedLSTM":
        """Copy a dense ``nn.LSTM`` (unidirectional, with biases, no projection, seq-first)."""
        if lstm.bidirectional or not lstm.bias or lstm.proj_size or lstm.batch_first:
            raise ValueError("only unidirectional, biased, seq-first nn.LSTM without projection is supported")
        weight = lstm.weight_ih_l0
        module = cls(lstm.input_size, lstm.hidden_size, lstm.num_layers, lstm.dropout, dtype=weight.dtype, device=weight.device)
        module.load_state_dict(lstm.state_dict())
        return module

    def part(self, kind: str, layer: int) -> nn.Module:
        return getattr(self, f"{kind}_l{layer}")

    def dense_matrix(self, kind: str, layer: int) -> Tensor:
        """W_i (kind "ih") or W_h ("hh") of ``layer`` as a dense (4h, in) matrix, whatever stores it."""
        part = self.part(kind, layer)
        return part.weight if type(part) is nn.Linear else part.dense_weight()

    def nn_lstm_state_dict(self) -> dict[str, Tensor]:
        """The weights under ``nn.LSTM``'s keys (dense), e.g. to export to the word_language_model example."""
        state = {}
        for layer in range(self.num_layers):
            for kind in ("ih", "hh"):
                state[f"weight_{kind}_l{layer}"] = self.dense_matrix(kind, layer).detach().clone()
            state[f"bias_ih_l{layer}"] = getattr(self, f"bias_ih_l{layer}").detach().clone()
            state[f"bias_hh_l{layer}"] = getattr(self, f"bias_hh_l{layer}").detach().clone()
        return state

    def all_dense(self) -> bool:
        return all(type(self.part(kind, layer)) is nn.Linear for layer in range(self.num_layers) for kind in ("ih", "hh"))

    def fusable(self) -> bool:
        """Dense W_h everywhere and W_i dense or plain low-rank: PyTorch's fused kernel can run every layer."""
        return all(type(self.part("hh", layer)) is nn.Linear and (type(self.part("ih", layer)) is nn.Linear or
                   (type(self.part("ih", layer)) is LowRankLinear and self.part("ih", layer).bias is None))
                   for layer in range(self.num_layers))

    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None, fused: bool | None = None):
        steps, batch, _ = input.shape
        if hx is None:
            zeros = input.new_zeros(self.num_layers, batch, self.hidden_size)
            hx = (zeros, zeros)
        # fused=None picks the fastest exact path; False forces the own recurrence (for checks and timing).
        if fused is None:
            fused = self.all_dense()
            if not fused and self.fusable():
                return self._forward_fused_lowrank_input(input, hx)
        if fused:
            return self._forward_fused(input, hx)
        return self._forward_loop(input, hx)

    def _forward_fused_lowrank_input(self, input: Tensor, hx: Tuple[Tensor, Tensor]):
        # Low-rank W_i = left @ right: project the input with ``right`` first (x -> k), then the fused kernel
        # applies ``left`` as its (4h x k) input matrix. Exact, and as fast as nn.LSTM minus the saved FLOPs.
        h0, c0 = hx
        x = input
        finals_h, finals_c = [], []
        for layer in range(self.num_layers):
            part = self.part("ih", layer)
            if type(part) is LowRankLinear:
                x, w_ih = F.linear(x, part.right), part.left
            else:
                w_ih = part.weight
            weights = [w_ih, self.part("hh", layer).weight, getattr(self, f"bias_ih_l{layer}"), getattr(self, f"bias_hh_l{layer}")]
            x, h, c = torch.lstm(x, (h0[layer:layer + 1], c0[layer:layer + 1]), weights, True, 1, 0.0, self.training, False, False)
            finals_h.append(h[0])
            finals_c.append(c[0])
            if self.training and self.dropout > 0 and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, True)
        return x, (torch.stack(finals_h), torch.stack(finals_c))

    def _forward_fused(self, input: Tensor, hx: Tuple[Tensor, Tensor]):
        weights = []
        for layer in range(self.num_layers):
            weights += [self.dense_matrix("ih", layer), self.dense_matrix("hh", layer),
                        getattr(self, f"bias_ih_l{layer}"), getattr(self, f"bias_hh_l{layer}")]
        output, h_n, c_n = torch.lstm(input, hx, weights, True, self.num_layers, float(self.dropout), self.training, False, False)
        return output, (h_n, c_n)

    def _forward_loop(self, input: Tensor, hx: Tuple[Tensor, Tensor]):
        h0, c0 = hx
        x = input
        finals_h, finals_c = [], []
        for layer in range(self.num_layers):
            steps, batch, width = x.shape
            bias = getattr(self, f"bias_ih_l{layer}") + getattr(self, f"bias_hh_l{layer}")
            # All input projections at once: one (T*B, in) x (in, 4h) product instead of T small ones.
            igates = (self.part("ih", layer)(x.reshape(steps * batch, width)) + bias).view(steps, batch, -1)
            hidden = self.part("hh", layer)
            if type(hidden) is LowRankLinear and hidden.bias is None:
                out, h, c = _compiled("lowrank")(igates, h0[layer], c0[layer], hidden.right.t(), hidden.left.t())
            elif type(hidden) is nn.Linear:
                out, h, c = _compiled("dense")(igates, h0[layer], c0[layer], hidden.weight.t())
            elif type(hidden) is PrunedLinear and hidden.bias is None:
                out, h, c = _compiled("dense")(igates, h0[layer], c0[layer], hidden.dense_weight().t())
            else:
                out, h, c = _recurrence_generic(igates, h0[layer], c0[layer], hidden)
            finals_h.append(h)
            finals_c.append(c)
            x = out
            if self.training and self.dropout > 0 and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, True)
        return x, (torch.stack(finals_h), torch.stack(finals_c))

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, dropout={self.dropout}"
