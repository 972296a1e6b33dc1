"""Hugging Face transformers models: directories (config + safetensors), GGUF files, in-memory modules."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmshrink.errors import CorruptFile, NotAModel, OutOfMemory
from lmshrink.models.family import LoadedModel, ModelFamily, register_family
from lmshrink.plan import Target
from lmshrink.safefiles import (out_of_memory, StoredTensor, check_directory_files, check_finite, check_regular, dtype_name, one_line,
                                read_json_object, resolve_inside, safetensors_header, same_dtype_kind)

# A plain Hugging Face directory the user points at may link its files elsewhere (a cache snapshot links each one into
# ../../blobs): its names must lie inside, its links may lead out, and each must end at a regular file. An lmshrink
# directory is stricter (lmshrink.io): everything it names stays inside.
LINKS_OUT = True

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


# Files in which transformers honours an ``auto_map`` (code to import from the model directory).
_CODE_MAPS = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")
# Config keys that count repeated blocks: each repeat stores at least one tensor, so they cannot exceed the stored count.
_COUNT_KEY = re.compile(r"(^|_)(layers?|experts)$")


def checked_config(folder: Path) -> dict:
    """The base model's config of a directory (config.json, unwrapped when lmshrink saved it), refused (before
    transformers sees it) when it or a tokenizer/processor config asks to run code from the directory, or when it
    names an architecture transformers does not have built in."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from lmshrink.hf_config import unwrap_base_config

    raw = read_json_object(resolve_inside(folder, "config.json", "config", LINKS_OUT), "config")
    config = unwrap_base_config(raw, folder / "config.json")
    for name in _CODE_MAPS:
        if os.path.lexists(folder / name):
            contents = (raw, config) if name == "config.json" else (read_json_object(resolve_inside(folder, name, name, LINKS_OUT), name),)
            if any("auto_map" in content for content in contents):
                raise NotAModel(f"MODEL: {str(folder / name)!r} has an 'auto_map': the model needs code from its directory, and "
                                "lmshrink never runs code from a model; allowed: architectures built into transformers")
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise CorruptFile(f"MODEL: config {str(folder / 'config.json')!r} lacks a 'model_type' string; allowed: a transformers "
                          "config (model_type such as 'llama', 'gpt2', 'bert')")
    if model_type not in CONFIG_MAPPING:
        raise NotAModel(f"MODEL: config {str(folder / 'config.json')!r} names model_type {model_type[:40]!r}, which this "
                        "transformers does not have built in; allowed: a built-in architecture (e.g. 'llama', 'gpt2', 'bert')")
    return config


def _bound_counts(config: Any, tensors: int, path: Path) -> None:
    """Refuse layer / expert counts above the number of stored tensors (building them would cost time for nothing)."""
    items = config.items() if isinstance(config, dict) else enumerate(config) if isinstance(config, list) else ()
    for key, value in items:
        if isinstance(value, (dict, list)):
            _bound_counts(value, tensors, path)
        elif isinstance(key, str) and _COUNT_KEY.search(key) and isinstance(value, int) and value > tensors:
            raise CorruptFile(f"MODEL: config {str(path)!r} asks for {key} = {value:,} but the weights hold {tensors} tensors; "
                              "allowed: a config matching its weights")


def _config_from_dict(config: dict, folder: Path):
    from lmshrink.hf_config import base_config_from_dict

    try:
        return base_config_from_dict(config, repr(str(folder / "config.json")))
    except CorruptFile:
        raise
    except Exception as error:  # noqa: BLE001 - transformers validates configs with many exception types
        raise CorruptFile(f"MODEL: config {str(folder / 'config.json')!r} is not a valid transformers config ({one_line(error)})") from error


def _bound_gguf(path: Path) -> None:
    """Refuse GGUF metadata that asks for more than the file stores, before transformers builds the model it describes:
    block / expert counts above the number of tensors, or blocks whose MLP alone (width x feed-forward width each)
    would hold more numbers than all the stored tensors together."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as error:  # noqa: BLE001 - the reader fails on a damaged file with struct.error, ValueError, ...
        raise CorruptFile(f"MODEL: GGUF file {str(path)!r} is truncated or corrupted ({one_line(error)})") from error
    tensors = len(reader.tensors)
    stored = sum(int(t.n_elements) for t in reader.tensors)
    values = {key: int(field.parts[-1][0]) for key, field in reader.fields.items()
              if key.endswith(("block_count", "expert_count", "embedding_length", "feed_forward_length"))
              and len(field.parts[-1]) == 1 and field.types and field.types[0].name in _GGUF_INTEGERS}
    for key, value in values.items():
        if key.endswith(("block_count", "expert_count")) and value > tensors:
            raise CorruptFile(f"MODEL: GGUF file {str(path)!r} asks for {key} = {value:,} but stores {tensors} tensors; "
                              "allowed: metadata matching the tensors")
    for key, blocks in values.items():
        if key.endswith("block_count"):
            prefix = key[: -len("block_count")]
            width, hidden = values.get(prefix + "embedding_length", 0), values.get(prefix + "feed_forward_length", 0)
            if blocks * width * hidden > stored:
                raise CorruptFile(f"MODEL: GGUF file {str(path)!r} describes {blocks:,} blocks of width {width:,} and feed-forward "
                                  f"width {hidden:,}, more numbers than its {stored:,} stored ones; allowed: metadata matching the tensors")


_GGUF_INTEGERS = {"UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "UINT64", "INT64"}


def _auto_config(folder: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except Exception as error:  # noqa: BLE001 - transformers validates configs with many exception types
        raise CorruptFile(f"MODEL: config {str(folder / 'config.json')!r} is not a valid transformers config ({one_line(error)})") from error


def _meta_model(auto, config, folder: Path) -> nn.Module:
    """The model a config describes, on the meta device: shapes only, nothing allocated."""
    try:
        with torch.device("meta"):
            return auto.from_config(config, dtype=torch.float32, trust_remote_code=False)
    except Exception as error:  # noqa: BLE001 - model constructors reject inconsistent configs in many ways
        raise CorruptFile(f"MODEL: config {str(folder / 'config.json')!r} does not describe a buildable model ({one_line(error)})") from error


def _load_tokenizer(folder: Path, **kwargs):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False, **kwargs)
    except Exception as error:  # noqa: BLE001 - the tokenizers library raises plain Exception for garbage files
        where = kwargs.get("gguf_file") or ", ".join(sorted(p.name for p in folder.iterdir() if "token" in p.name or p.name.startswith(("vocab", "merges")))) or "none present"
        raise CorruptFile(f"MODEL: the tokenizer of {str(folder)!r} cannot be loaded (files: {where}; {one_line(error)})") from error


def _stored_tensors(folder: Path) -> tuple[dict[str, StoredTensor], list[Path]]:
    """The header of every safetensors file of a Hugging Face directory (one file, or the shards an index names)."""
    index = folder / "model.safetensors.index.json"
    if os.path.lexists(index):
        weight_map = read_json_object(resolve_inside(folder, index.name, "weights index", LINKS_OUT), "weights index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CorruptFile(f"MODEL: weights index {str(index)!r} has no 'weight_map' object")
        files = [resolve_inside(folder, name, "weights shard", LINKS_OUT) for name in sorted(set(map(str, weight_map.values())))]
    elif os.path.lexists(folder / "model.safetensors"):
        files = [resolve_inside(folder, "model.safetensors", "weights file", LINKS_OUT)]
    else:
        raise NotAModel(f"MODEL: {str(folder)!r} has no model.safetensors (nor an index of shards); lmshrink loads safetensors "
                        "weights only (other formats are unpickled, which can run code)")
    stored: dict[str, StoredTensor] = {}
    for path in files:
        stored.update(safetensors_header(path))
    return stored, files


def _stored_name(name: str, stored: dict, prefix: str) -> str | None:
    # Checkpoints name tensors with or without the base model's prefix ("model.", "transformer.", "bert.").
    for candidate in (name, f"{prefix}.{name}", name.removeprefix(f"{prefix}.")):
        if candidate in stored:
            return candidate
    return None


def _bound_size(skeleton: nn.Module, stored: dict[str, StoredTensor], path: Path) -> None:
    """Refuse a config whose model holds more numbers than the weights store (the rest would be allocated at random),
    naming the tensors the weights lack when names tell."""
    unique = {id(p): p.numel() for p in skeleton.parameters()}
    wanted, held = sum(unique.values()), sum(t.numel for t in stored.values())
    if wanted > held:
        prefix = getattr(skeleton, "base_model_prefix", "") or ""
        groups: dict[int, list[str]] = {}
        for name, tensor in skeleton.state_dict(keep_vars=True).items():
            groups.setdefault(id(tensor), []).append(name)
        missing = [names[0] for names in groups.values() if not any(_stored_name(n, stored, prefix) for n in names)]
        lacking = f" (it lacks {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''})" if missing else ""
        raise CorruptFile(f"MODEL: config {str(path / 'config.json')!r} describes {wanted:,} parameters but the weights hold "
                          f"{held:,} numbers{lacking}; allowed: weights holding every parameter of the config's model")


def _check_loaded(model: nn.Module, info: dict, stored: dict[str, StoredTensor] | None, source: Path) -> None:
    """Strictness after transformers' own loading: nothing missing or mismatched, no dtype changed kind, all finite."""
    missing = sorted(info.get("missing_keys") or ())
    mismatched = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or ())
    if missing:
        raise CorruptFile(f"MODEL: {str(source)!r} lacks {len(missing)} tensor(s) the model needs: {', '.join(missing[:5])}"
                          + (" ..." if len(missing) > 5 else "") + "; allowed: weights holding every parameter")
    if mismatched:
        raise CorruptFile(f"MODEL: {str(source)!r} holds tensors of the wrong shape: {', '.join(mismatched[:5])}")
    state = model.state_dict()
    prefix = getattr(model, "base_model_prefix", "") or ""
    for name, info_stored in (stored or {}).items():
        candidate = _stored_name(name, state, prefix)
        if candidate is not None and not same_dtype_kind(info_stored.dtype, dtype_name(state[candidate].dtype)):
            raise CorruptFile(f"MODEL: tensor {name!r} in {str(source)!r} is {info_stored.dtype}, the model's "
                              f"{candidate!r} is {dtype_name(state[candidate].dtype)}; allowed: the parameter's kind of dtype")
    for name, tensor in state.items():
        check_finite(tensor, name, source)


class _HuggingFace(ModelFamily):
    """Causal LMs (LLaMA, GPT-2, ...) and encoders (BERT, MiniLM, ...) from transformers.

    Loading is strict and never runs code from the model: every transformers call passes ``trust_remote_code=False``,
    directories whose configs carry an ``auto_map`` are refused before transformers reads them, and every tensor the
    model needs must come from the files.
    """

    def detect(self, path: Path) -> bool:
        return path.suffix == ".gguf" and path.is_file() or (path / "config.json").is_file()

    def load(self, path: Path) -> LoadedModel:
        _quiet_transformers()
        if path.suffix == ".gguf":
            return self._load_gguf(path)
        from transformers import AutoModel, AutoModelForCausalLM

        check_directory_files(path, LINKS_OUT)
        config_dict = checked_config(path)
        stored, files = _stored_tensors(path)
        _bound_counts(config_dict, len(stored), path / "config.json")
        config = _auto_config(path)
        causal = _is_causal_config(config)
        auto = AutoModelForCausalLM if causal else AutoModel
        _bound_size(_meta_model(auto, config, path), stored, path)
        tokenizer = _load_tokenizer(path)
        source = files[0] if len(files) == 1 else path
        try:
            model, info = auto.from_pretrained(path, dtype=torch.float32, trust_remote_code=False, use_safetensors=True,
                                               output_loading_info=True)
        except Exception as error:  # noqa: BLE001 - a damaged file surfaces as any of several types inside transformers
            if out_of_memory(error):  # not a damaged file: say what it is and what fits
                raise OutOfMemory(f"MODEL: {str(path)!r} does not fit in this process's memory whole ({one_line(error)}); allowed: "
                                  "`lmshrink compress --sequential`, which holds one decoder block at a time") from error
            raise CorruptFile(f"MODEL: {str(source)!r} could not be loaded as the model its config describes ({one_line(error)})") from error
        _check_loaded(model, info, stored, source)
        model.eval()
        return LoadedModel(model, HF_CAUSAL if causal else HF_ENCODER, tokenizer, str(path))

    def _load_gguf(self, path: Path) -> LoadedModel:
        from transformers import AutoModelForCausalLM

        check_regular(path, "GGUF file")
        _bound_gguf(path)
        try:
            with _quiet_gguf_reader():
                tokenizer = _load_tokenizer(path.parent, gguf_file=path.name)
                model, info = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                                   trust_remote_code=False, output_loading_info=True)
        except Exception as error:  # noqa: BLE001 - the GGUF parser fails on a damaged file with struct.error, ValueError, ...
            raise CorruptFile(f"MODEL: GGUF file {str(path)!r} is truncated or corrupted ({one_line(error)})") from error
        _check_loaded(model, info, None, path)
        model.eval()
        return LoadedModel(model, HF_CAUSAL, tokenizer, str(path))

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

    def leading_token(self, loaded: LoadedModel) -> int | None:
        # Gemma's tokenizer prepends <bos> and the model was trained with it: windows without it score far worse than
        # the model is. SmolLM2's tokenizer prepends nothing, so nothing changes there.
        tokenizer = loaded.tokenizer
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None or not self.causal:
            return None
        ids = tokenizer("a", verbose=False)["input_ids"]
        return int(bos) if ids and ids[0] == bos else None

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
        from lmshrink.hf_config import write_config

        # lmshrink's own model_type with the base config inside: plain transformers refuses the directory instead of
        # loading the factors' base architecture with random dense weights.
        write_config(directory, loaded.model.config, loaded.causal)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(directory)
        return {"causal": loaded.causal, "tokenizer": loaded.tokenizer is not None}

    def build_empty(self, directory: Path, base: dict[str, Any], stored: dict | None = None) -> LoadedModel:
        from transformers import AutoModel, AutoModelForCausalLM

        _quiet_transformers()
        causal, has_tokenizer = base.get("causal"), base.get("tokenizer", False)
        if not isinstance(causal, bool) or not isinstance(has_tokenizer, bool):
            raise CorruptFile(f"MODEL: manifest in {str(directory)!r} has base {str(base)[:80]}; allowed: "
                              "{'causal': true|false, 'tokenizer': true|false}")
        config_dict = checked_config(directory)
        if stored is not None:
            _bound_counts(config_dict, len(stored), directory / "config.json")
        model = _meta_model(AutoModelForCausalLM if causal else AutoModel, _config_from_dict(config_dict, directory), directory)
        tokenizer = _load_tokenizer(directory) if has_tokenizer else None
        model.eval()
        return LoadedModel(model, HF_CAUSAL if causal else HF_ENCODER, tokenizer, str(directory))

    def materialize(self, loaded: LoadedModel) -> None:
        # Buffers a model computes at construction and does not store (rotary frequencies, position ids) come out of
        # to_empty as garbage: transformers' own per-module initialisation recomputes them, as its loader does. A
        # sentinel proves each one was recomputed; any left over is refused rather than used.
        model = loaded.model
        model.to_empty(device="cpu")
        owners = [(module, name) for module in model.modules() for name in module._non_persistent_buffers_set
                  if module._buffers.get(name) is not None]
        with torch.no_grad():
            for module, name in owners:
                buffer = module._buffers[name]
                buffer.fill_(float("nan") if buffer.is_floating_point() else torch.iinfo(buffer.dtype).min if buffer.dtype != torch.bool else 0)
            for module in {id(m): m for m, _ in owners}.values():
                model._init_weights(module)
        for module, name in owners:
            buffer = module._buffers[name]
            unset = torch.isnan(buffer) if buffer.is_floating_point() else buffer == torch.iinfo(buffer.dtype).min if buffer.dtype != torch.bool else None
            if unset is not None and bool(unset.any()):
                raise CorruptFile(f"MODEL: {loaded.source!r}: transformers did not recompute the buffer {name!r} of "
                                  f"{type(module).__name__}; this architecture cannot be rebuilt without its original weights")


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


HF_CAUSAL, HF_ENCODER = register_family(HuggingFaceCausal()), register_family(HuggingFaceEncoder())
