"""Export a compressed model as a plain Hugging Face checkpoint: every factorized layer multiplied back into the dense
weight of the module it replaced, in the base architecture (for runtimes that have no low-rank layers).

The dense checkpoint computes what the compressed model computes (same logits up to float rounding, checked before
anything is written) but is as large as the original: the size gain is lost, the quality stays.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from lmshrink.errors import InvalidArgument, LmshrinkError
from lmshrink.layers import LAYER_TYPES, layer_type
from lmshrink.layers.base import FactorizedModule


def _has_dense_weight(kind: type) -> bool:
    return getattr(kind, "dense_weight", None) is not FactorizedModule.dense_weight


def densifiable_layers() -> list[str]:
    """Layer types that stand for one dense matrix (they implement ``dense_weight``)."""
    layer_type("LowRankLinear")  # imports every layer module, so the registry is complete
    return sorted(name for name, kind in LAYER_TYPES.items() if _has_dense_weight(kind))


def _dense_tensors(name: str, layer: nn.Module, base: nn.Module) -> dict[str, torch.Tensor] | None:
    """State-dict entries of the base module ``base`` that reproduce ``layer``; None when it cannot be done exactly."""
    if not _has_dense_weight(type(layer)):
        return None
    try:
        weight = layer.dense_weight().detach()  # (out, in) for linears, (V, d) for tables
    except NotImplementedError:  # e.g. a TiedHead over an embedding that has no dense form
        return None
    if type(base).__name__ == "Conv1D":  # GPT-2 stores (in, out)
        weight = weight.T
    elif not isinstance(base, (nn.Linear, nn.Embedding)):
        return None
    if getattr(base, "weight", None) is None or base.weight.shape != weight.shape:
        return None
    tensors = {f"{name}.weight": weight}
    bias, base_bias = getattr(layer, "bias", None), getattr(base, "bias", None)
    if (bias is None) != (base_bias is None):
        return None
    if bias is not None:
        tensors[f"{name}.bias"] = bias.detach()
    return tensors


def densify(loaded) -> nn.Module:
    """A new model of the base architecture whose dense weights reproduce ``loaded``'s factorized layers exactly.

    Raises InvalidArgument naming the layers that have no exact dense form in the base architecture.
    """
    from transformers import AutoModel, AutoModelForCausalLM

    compressed = loaded.model
    auto = AutoModelForCausalLM if loaded.causal else AutoModel
    dtype = next(compressed.parameters()).dtype
    dense = auto.from_config(compressed.config, dtype=dtype).eval()
    filled, refused = {}, []
    for name, module in compressed.named_modules():
        if not isinstance(module, FactorizedModule):
            continue
        try:
            base = dense.get_submodule(name)
        except AttributeError:
            base = None
        tensors = None if base is None else _dense_tensors(name, module, base)
        if tensors is None:
            refused.append(f"{name} ({type(module).__name__})")
        else:
            filled.update(tensors)
    if refused:
        raise InvalidArgument("MODEL_DIR", f"cannot densify {', '.join(refused[:5])}{' ...' if len(refused) > 5 else ''} "
                                           "exactly into the base architecture",
                              f"models whose factorized layers are of these types: {', '.join(densifiable_layers())}")
    own = compressed.state_dict()
    state = {}
    for key in dense.state_dict():
        # A tied embedding and output layer appear under both names: the factorized embedding and its TiedHead fill both.
        source = filled.get(key, own.get(key))
        if source is None:
            raise LmshrinkError(f"MODEL_DIR: no tensor for {key!r} in the compressed model; cannot build the dense checkpoint")
        state[key] = source
    dense.load_state_dict(state, strict=True)
    return dense


@torch.no_grad()
def _check_same_outputs(loaded, dense: nn.Module) -> None:
    """The dense model must compute what the compressed one does: compare outputs on a fixed batch of tokens."""
    config = dense.config.get_text_config() if hasattr(dense.config, "get_text_config") else dense.config
    length = min(16, getattr(config, "max_position_embeddings", 16) or 16)
    ids = torch.randint(0, int(config.vocab_size), (2, length), generator=torch.Generator().manual_seed(0))
    device = next(loaded.model.parameters()).device

    def outputs(model):
        result = model(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device))
        return (result.logits if loaded.causal else result.last_hidden_state).float()

    want, got = outputs(loaded.model), outputs(dense.to(device))
    error = float((want - got).abs().max() / want.abs().max().clamp_min(1e-12))
    tolerance = 1e-4 if want.dtype == torch.float32 and got.dtype == torch.float32 and dense.dtype == torch.float32 else 2e-2
    if not error <= tolerance:
        raise LmshrinkError(f"MODEL_DIR: the densified model's outputs differ from the compressed model's by {error:.2e} "
                            f"(relative, tolerance {tolerance:g}); not written")


def export_dense(model, out: str | Path) -> Path:
    """Write ``model`` (a saved lmshrink directory or anything load_model accepts) as a plain Hugging Face checkpoint
    (model.safetensors, the base config.json, tokenizer files) at ``out``: built in a temporary sibling, renamed at the end."""
    from lmshrink.models import FAMILIES, load_model

    target = Path(out).expanduser().resolve()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise InvalidArgument("--out", f"{str(target)!r} exists and is not an empty directory", "a new or empty directory")
    loaded = load_model(model)
    if loaded.family not in (FAMILIES["hf"], FAMILIES["hf-encoder"]):
        raise InvalidArgument("MODEL_DIR", f"{loaded.source!r} is a {loaded.family.name!r} model", "a compressed Hugging Face model")
    dense = densify(loaded)
    _check_same_outputs(loaded, dense)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        dense.to("cpu").save_pretrained(staging)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(staging)
        if target.exists():
            target.rmdir()  # empty, checked above
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
