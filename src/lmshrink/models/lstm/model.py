"""``RNNModel``: the word_language_model example's LSTM LM, with a FactorizedLSTM; its state dicts in and out."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmshrink.errors import InvalidArgument, NotAModel
from lmshrink.layers.lstm import FactorizedLSTM
from lmshrink.safefiles import check_finite, one_line


@dataclass
class LSTMConfig:
    ntoken: int
    ninp: int = 200
    nhid: int = 200
    nlayers: int = 2
    dropout: float = 0.2
    tie_weights: bool = False


class RNNModel(nn.Module):
    """Embedding -> dropout -> multi-layer LSTM -> dropout -> linear decoder, as the example's ``RNNModel``."""

    def __init__(self, ntoken: int, ninp: int = 200, nhid: int = 200, nlayers: int = 2, dropout: float = 0.2,
                 tie_weights: bool = False):
        super().__init__()
        if tie_weights and nhid != ninp:
            raise InvalidArgument("tie_weights", f"needs nhid == ninp, got {nhid} and {ninp}", "equal sizes, or tie_weights=False")
        self.config = LSTMConfig(ntoken, ninp, nhid, nlayers, dropout, tie_weights)
        self.ntoken, self.nhid, self.nlayers, self.rnn_type = ntoken, nhid, nlayers, "LSTM"
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = FactorizedLSTM(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        if tie_weights:
            self.decoder.weight = self.encoder.weight
        # The example's initialisation: uniform(-0.1, 0.1) embedding and decoder, zero decoder bias.
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        if not tie_weights:
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def init_hidden(self, batch_size: int) -> tuple[Tensor, Tensor]:
        weight = self.decoder.bias
        zeros = weight.new_zeros(self.nlayers, batch_size, self.nhid)
        return zeros, zeros.clone()

    def forward(self, input: Tensor, hidden: tuple[Tensor, Tensor] | None = None):
        """(T, B) ids -> (logits (T, B, V), (h, c))."""
        embedded = self.drop(self.encoder(input))
        output, hidden = self.rnn(embedded, hidden)
        return self.decoder(self.drop(output)), hidden


def model_from_state_dict(state: dict[str, Tensor], dropout: float = 0.2) -> RNNModel:
    """An ``RNNModel`` shaped after an example state dict (LSTM only), loaded with it."""
    try:
        ntoken, ninp = state["encoder.weight"].shape
        nhid = state["rnn.weight_hh_l0"].shape[1] if "rnn.weight_hh_l0" in state else state["rnn.hh_l0.weight"].shape[1]
        gates = state["rnn.weight_ih_l0"].shape[0] if "rnn.weight_ih_l0" in state else state["rnn.ih_l0.weight"].shape[0]
    except KeyError as error:
        raise NotAModel(f"MODEL: state dict has no {error.args[0]!r}: not a word_language_model RNNModel "
                        f"(keys: {sorted(state)[:6]})") from error
    except (ValueError, IndexError) as error:  # a tensor of the wrong number of dimensions
        raise NotAModel(f"MODEL: state dict tensors have the wrong number of dimensions for an RNNModel ({error})") from error
    if min(ntoken, ninp, nhid, gates) < 1:
        raise NotAModel(f"MODEL: state dict holds empty tensors (embedding {ntoken}x{ninp}, hidden size {nhid}): not a trained RNNModel")
    if gates != 4 * nhid:
        raise NotAModel(f"MODEL: rnn has {gates} gate rows for hidden size {nhid}: only LSTM checkpoints are supported "
                        f"(4 x hidden rows), not GRU ({3 * nhid}) or plain RNN ({nhid})")
    layer_key = re.compile(r"rnn\.(?:weight_hh_l(\d+)|hh_l(\d+)\.weight)")
    layers = {int(m.group(1) or m.group(2)) for m in map(layer_key.fullmatch, state) if m}
    nlayers = max(layers) + 1
    if nlayers > len(state):  # every layer stores tensors: a larger index is a damaged checkpoint, not a size to build
        raise NotAModel(f"MODEL: state dict names LSTM layer {nlayers - 1} but holds {len(state)} tensors")
    for name, tensor in state.items():
        check_finite(tensor, name, "checkpoint")
    decoder = state.get("decoder.weight")
    tied = bool(decoder is not None and decoder.shape == state["encoder.weight"].shape and torch.equal(decoder, state["encoder.weight"]))
    model = RNNModel(ntoken, ninp, nhid, nlayers, dropout, tie_weights=tied)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise NotAModel(f"MODEL: state dict does not fit an LSTM RNNModel of {nlayers} layers, {ninp} inputs, {nhid} hidden "
                        f"({one_line(error).rstrip(':')})") from error
    return model


def example_state_dict(model: RNNModel) -> dict[str, Tensor]:
    """The model's weights under the example's keys (dense), loadable by its ``model.RNNModel``."""
    state = {"encoder.weight": model.encoder.weight.detach().clone()}
    state.update({f"rnn.{k}": v for k, v in model.rnn.nn_lstm_state_dict().items()})
    state["decoder.weight"] = model.decoder.weight.detach().clone()
    state["decoder.bias"] = model.decoder.bias.detach().clone()
    return state
