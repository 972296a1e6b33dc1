"""Hugging Face transformers models: directories (config + safetensors), GGUF files, in-memory modules."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmshrink.errors import NotAModel
from lmshrink.models import LoadedModel, ModelFamily
from lmshrink.plan import Target

# Linear layers are grouped by where they sit, so "attention" and "mlp" mean the same across architectures.
_ATTENTION = re.compile(r"(^|\.)(self_attn|attn|attention|self_attention)(\.|$)")
_MLP = re.compile(r"(^|\.)(mlp|ffn|feed_forward|intermediate)(\.|$)|(^|\.)layer\.\d+\.output\.dense$")


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # lmshrink shows its own progress; per-tensor loading bars are noise
    logging.getLogger("transformers").setLevel(logging.ERROR)


@contextlib.contextmanager
def _quiet_gguf_reader():
    # transformers' GGUF reader draws its own tqdm bar whatever disable_progress_bar() says; mute it for one load.
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    original = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


class _HuggingFace(ModelFamily):
    """Causal LMs (LLaMA, GPT-2, ...) and encoders (BERT, MiniLM, ...) from transformers."""

    def detect(self, path: Path) -> bool:
        return path.suffix == ".gguf" and path.is_file() or (path / "config.json").is_file()

    def load(self, path: Path) -> LoadedModel:
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

        _quiet_transformers()
        try:
            if path.suffix == ".gguf":
                kwargs = {"gguf_file": path.name}
                folder = path.parent
                causal = True
            else:
                kwargs = {}
                folder = path
                config = AutoConfig.from_pretrained(folder)
                causal = _is_causal_config(config)
            with _quiet_gguf_reader():
                tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
                auto = AutoModelForCausalLM if causal else AutoModel
                model = auto.from_pretrained(folder, dtype=torch.float32, **kwargs)
        except (OSError, ValueError, KeyError) as error:
            raise NotAModel(f"MODEL: {str(path)!r} could not be loaded as a Hugging Face model: {error}".splitlines()[0]) from error
        model.eval()
        return LoadedModel(model, HF_CAUSAL if causal else HF_ENCODER, tokenizer, str(path))

    def wrap(self, module: nn.Module, tokenizer: Any = None) -> LoadedModel:
        causal = hasattr(module, "get_output_embeddings") and module.get_output_embeddings() is not None
        return LoadedModel(module, HF_CAUSAL if causal else HF_ENCODER, tokenizer)

    def candidates(self, loaded: LoadedModel) -> list[Target]:
        model = loaded.model
        names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
        embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        embedding_name = names.get(id(embedding))
        head_name = names.get(id(head)) if head is not None else None
        tied = (embedding is not None and head is not None and getattr(head, "weight", None) is not None
                and getattr(embedding, "weight", None) is not None and head.weight is embedding.weight)
        targets = []
        for name, module in model.named_modules():
            if isinstance(module, nn.Embedding) and name == embedding_name:
                targets.append(Target(name, module, "embedding", "embedding", head_name if tied else None))
            elif _is_linear(module):
                if name == head_name:
                    if not tied:
                        targets.append(Target(name, module, "lm_head", "lm_head"))
                    continue
                group = "attention" if _ATTENTION.search(name) else "mlp" if _MLP.search(name) else "other"
                targets.append(Target(name, module, "linear", group))
        return targets

    def encode(self, loaded: LoadedModel, text: str) -> list[int]:
        if loaded.tokenizer is None:
            raise NotAModel("MODEL: this model has no tokenizer; pass one to load_model(module, tokenizer=...)")
        # Long texts are expected here (whole corpora), so silence the max-length warning.
        return loaded.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    def logits(self, loaded: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
        return loaded.model(input_ids=ids, use_cache=False).logits

    def embed(self, loaded: LoadedModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = loaded.model(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)  # mean pooling, as sentence-transformers does

    def untie_head(self, loaded: LoadedModel) -> None:
        # Multimodal configs keep the flag on their text config; either way it is what from_config reads.
        config = loaded.model.config
        for part in {id(c): c for c in (config, config.get_text_config())}.values():
            part.tie_word_embeddings = False

    def save_base(self, loaded: LoadedModel, directory: Path) -> dict[str, Any]:
        from lmshrink.hf_compat import write_config

        # lmshrink's own model_type with the base config inside: plain transformers refuses the directory instead of
        # loading the factors' base architecture with random dense weights.
        write_config(directory, loaded.model.config, loaded.causal)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(directory)
        return {"causal": loaded.causal, "tokenizer": loaded.tokenizer is not None}

    def build_empty(self, directory: Path, base: dict[str, Any]) -> LoadedModel:
        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

        from lmshrink.hf_compat import read_base_config

        _quiet_transformers()
        config = read_base_config(directory)
        auto = AutoModelForCausalLM if base["causal"] else AutoModel
        model = auto.from_config(config, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(directory) if base.get("tokenizer") else None
        model.eval()
        return LoadedModel(model, HF_CAUSAL if base["causal"] else HF_ENCODER, tokenizer, str(directory))


class HuggingFaceCausal(_HuggingFace):
    name = "hf"
    causal = True


class HuggingFaceEncoder(_HuggingFace):
    name = "hf-encoder"
    causal = False

    def detect(self, path: Path) -> bool:
        return False  # loading goes through "hf", which picks causal or encoder from the config


def _is_causal_config(config) -> bool:
    architectures = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return True
    if architectures:
        return False
    return bool(getattr(config, "is_decoder", False))


from lmshrink.models import FAMILIES  # noqa: E402  (filled by the subclass definitions above)

HF_CAUSAL, HF_ENCODER = FAMILIES["hf"], FAMILIES["hf-encoder"]
