"""The decoder-block seam of Hugging Face causal decoders: stem -> blocks -> final norm -> head.

A ``DecoderStack`` wraps a model built on the meta device (``build_skeleton``) and exposes its decoder
blocks (the ``ModuleList`` of the base model's ``layers``) and everything outside them (embedding, final
norm, head, rotary embedding). The block-by-block engine materializes one block at a time; what a block
is called with (attention mask, rotary cos/sin, position ids, per-layer-type masks as Gemma 3 has) is
captured by running the model's own forward with the blocks replaced by recording stubs, so every
architecture computes its own masks and rotary embeddings and no block weights are needed for that.
The head is applied the same way: the model's forward on ``inputs_embeds`` = the last block's output with
pass-through stubs, so the final norm, head and any logit soft-capping are the model's own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lmshrink.errors import InvalidArgument

# Families known to fit the seam (transformers 5: blocks return the hidden state as one tensor).
BLOCK_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2", "granite")
# Positions whose logits a block-by-block pass holds at once. A whole window's logits, their log-softmax and its
# gradient would be a run's largest tensors for a big vocabulary: 512 x 262,144 float32 = 512 MiB each for Gemma 3.
LOGIT_CHUNK = 64


def build_skeleton(config, dtype: torch.dtype) -> nn.Module:
    """The causal LM of ``config`` with parameters on the meta device (no memory) and real buffers.

    Buffers are small and some are not in any checkpoint (rotary inv_freq, Gemma's embedding scale): building them
    for real here means nothing has to recompute them after the parameters are filled.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from lmshrink.models.hf import _quiet_transformers

    _quiet_transformers()
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # transformers skips tying on the meta device; ``materialize`` keeps what is tied here
    model.eval()
    return model


class _StopForward(Exception):
    pass


class _Stub(nn.Module):
    """Stands in for a decoder block: records its call, returns its hidden-state input unchanged.

    Attribute lookups fall through to the real block, since some models read block attributes in their
    forward (e.g. ``attention_type``).
    """

    def __init__(self, block: nn.Module, calls: list | None, stop: bool):
        super().__init__()
        object.__setattr__(self, "_block", block)  # a reference, not a submodule
        self._calls, self._stop = calls, stop

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if self._calls is not None:
            rest = dict(kwargs)
            rest.pop("hidden_states", None)
            self._calls.append((hidden, tuple(args[1:]), rest))
        if self._stop:
            raise _StopForward
        return hidden


class DecoderStack:
    """A causal decoder seen as stem -> blocks -> final norm -> head (see the module docstring)."""

    def __init__(self, model: nn.Module):
        base = getattr(model, "base_model", None)
        blocks = getattr(base, "layers", None)
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        if not isinstance(blocks, nn.ModuleList) or not hasattr(base, "norm") or model.get_output_embeddings() is None:
            raise InvalidArgument("--sequential", f"model type {model_type!r} has no decoder-block stack this engine knows",
                                  "a Hugging Face causal decoder with model.layers and model.norm (" + ", ".join(BLOCK_FAMILIES) + ")")
        self.model, self.blocks = model, blocks
        names = {id(m): n for n, m in model.named_modules()}
        self.blocks_name = names[id(blocks)]

    def __len__(self) -> int:
        return len(self.blocks)

    def prefix(self, index: int) -> str:
        """State-dict prefix of block ``index`` in the whole model ("model.layers.3.")."""
        return f"{self.blocks_name}.{index}."

    def outer_modules(self) -> list[nn.Module]:
        """Every module outside the blocks (embedding, norm, head, rotary, the wrappers)."""
        inside = {id(m) for m in self.blocks.modules()}
        return [m for m in self.model.modules() if id(m) not in inside]

    @contextlib.contextmanager
    def _stubbed(self, calls: list[list] | None = None):
        originals = list(self.blocks)
        last = len(originals) - 1
        try:
            for index, block in enumerate(originals):
                self.blocks[index] = _Stub(block, None if calls is None else calls[index], stop=calls is not None and index == last)
            yield
        finally:
            for index, block in enumerate(originals):
                self.blocks[index] = block

    def capture(self, ids: torch.Tensor) -> tuple[torch.Tensor, list[tuple[tuple, dict]]]:
        """For one batch of token ids: the first block's input and, per block, the (args, kwargs) it is called with.

        Needs only the embedding (and whatever the model's forward touches before the blocks) materialized.
        """
        calls: list[list] = [[] for _ in self.blocks]
        with self._stubbed(calls), torch.no_grad():
            try:
                self.model(input_ids=ids, use_cache=False)
            except _StopForward:
                pass
        if any(len(c) != 1 for c in calls):
            raise InvalidArgument("--sequential", "the model does not call each decoder block exactly once per forward",
                                  "a plain decoder stack (" + ", ".join(BLOCK_FAMILIES) + ")")
        first = calls[0][0][0]
        return first, [(args, kwargs) for _, args, kwargs in (c[0] for c in calls)]

    def logits(self, hidden: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The head applied to the last block's output: final norm, output layer, soft-capping as the model does;
        ``positions`` (1-D): only those positions' logits (transformers' ``logits_to_keep``)."""
        keep = {} if positions is None else {"logits_to_keep": positions}
        with self._stubbed():
            return self.model(inputs_embeds=hidden, use_cache=False, **keep).logits

    def logit_chunks(self, length: int, device) -> Iterator[torch.Tensor]:
        """Positions 0..length-1 in runs of LOGIT_CHUNK, for ``logits(hidden, positions)``."""
        for start in range(0, length, LOGIT_CHUNK):
            yield torch.arange(start, min(start + LOGIT_CHUNK, length), device=device)


def run_block(block: nn.Module, hidden: torch.Tensor, call: tuple[tuple, dict]) -> torch.Tensor:
    """One block's output for its input ``hidden`` and captured call (args, kwargs)."""
    args, kwargs = call
    out = block(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def to_device(value: Any, device, dtype: torch.dtype | None = None, memo: dict | None = None) -> Any:
    """Tensors inside nested tuples/lists/dicts moved to ``device`` (floating ones cast to ``dtype``); shared once."""
    memo = {} if memo is None else memo
    if isinstance(value, torch.Tensor):
        if id(value) not in memo:
            cast = dtype if dtype is not None and value.is_floating_point() else None
            memo[id(value)] = value.to(device=device, dtype=cast)
        return memo[id(value)]
    if isinstance(value, tuple):
        return tuple(to_device(v, device, dtype, memo) for v in value)
    if isinstance(value, list):
        return [to_device(v, device, dtype, memo) for v in value]
    if isinstance(value, dict):
        return {k: to_device(v, device, dtype, memo) for k, v in value.items()}
    return value
