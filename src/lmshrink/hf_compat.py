"""Saved lmshrink directories in the Hugging Face ecosystem (transformers' Auto classes, pipelines, generate).

A saved directory's config.json has lmshrink's own ``model_type`` with the base model's config kept inside
(``config["lmshrink"]["base_config"]``). Plain transformers therefore refuses the directory, naming lmshrink,
instead of building the dense base model and filling its attention/MLP weights at random (the factors do not
match the base model's parameter names). The base config sits one level deeper than transformers' own
sub-config lookup, so ``LlamaForCausalLM.from_pretrained(saved_dir)`` does not pick it up either.

``register()`` (called once by ``import lmshrink``) teaches transformers that model type through its own
``register`` API, never ``trust_remote_code``: ``AutoModelForCausalLM.from_pretrained(saved_dir)`` (``AutoModel``
for encoders) goes through ``lmshrink.load``, so every check of lmshrink's loader applies and no code from the
directory runs, and returns the base architecture's transformers model with the factorized modules inside.
Its ``save_pretrained`` writes an lmshrink directory again.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PretrainedConfig

from lmshrink.errors import CorruptFile, InvalidArgument, NotAModel

MODEL_TYPE = "lmshrink"
CONFIG = "config.json"
HOW_TO_LOAD = ("a model compressed by lmshrink: its safetensors shards hold factorized layers, not the base model's dense weights. "
               "Load it with `import lmshrink` and then AutoModelForCausalLM.from_pretrained(DIR) (AutoModel for encoders), "
               "or lmshrink.load(DIR); `lmshrink export DIR --dense --out OUT` writes a plain Hugging Face checkpoint")


class LmshrinkConfig(PretrainedConfig):
    """config.json of a saved lmshrink directory: {"model_type": "lmshrink", "lmshrink": {"base_config": {...}, ...}}."""

    model_type = MODEL_TYPE

    def __init__(self, lmshrink: dict[str, Any] | None = None, **kwargs):
        self.lmshrink = dict(lmshrink or {})
        super().__init__(**kwargs)

    @property
    def causal(self) -> bool:
        return bool(self.lmshrink.get("causal", True))

    def base(self) -> PretrainedConfig:
        """The base model's own config (LlamaConfig, GPT2Config, BertConfig, ...)."""
        return base_config_from_dict(self.lmshrink.get("base_config"), "config.json")


def base_config_from_dict(data: Any, where: str) -> PretrainedConfig:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = data.get("model_type") if isinstance(data, dict) else None
    if model_type is None or model_type == MODEL_TYPE or model_type not in CONFIG_MAPPING:
        raise CorruptFile(f"MODEL: {where} names base model type {model_type!r}, which this transformers does not know")
    return CONFIG_MAPPING[model_type].from_dict(data)


def write_config(directory: Path, base_config: PretrainedConfig, causal: bool) -> None:
    """Write ``directory/config.json``: lmshrink's model type, with ``base_config`` inside."""
    architecture = LmshrinkForCausalLM.__name__ if causal else LmshrinkModel.__name__
    config = LmshrinkConfig(lmshrink={"about": HOW_TO_LOAD, "causal": causal, "base_config": base_config.to_dict()},
                            architectures=[architecture])
    config.to_json_file(Path(directory) / CONFIG, use_diff=True)


def unwrap_base_config(config: dict, path: Path) -> dict:
    """The base model's config from a directory's config.json: inside lmshrink's wrapper, or as it is (a plain Hugging
    Face directory, or one lmshrink saved before config.json was wrapped)."""
    if config.get("model_type") != MODEL_TYPE:
        return config
    inner = config.get("lmshrink")
    base = inner.get("base_config") if isinstance(inner, dict) else None
    if not isinstance(base, dict):
        raise CorruptFile(f"MODEL: config {str(path)!r} is lmshrink's but holds no base model config; allowed: "
                          "{'model_type': 'lmshrink', 'lmshrink': {'base_config': {...}}}")
    return base


class _SavesAsLmshrink:
    """Mixed into a loaded model's class: ``save_pretrained`` writes an lmshrink directory (factors + manifest)."""

    def save_pretrained(self, save_directory, is_main_process: bool = True, state_dict=None, push_to_hub: bool = False, **kwargs):
        if push_to_hub or state_dict is not None:
            raise InvalidArgument("save_pretrained", "push_to_hub and state_dict are not supported for lmshrink models",
                                  "save_pretrained(DIR), then upload the directory")
        if not is_main_process:
            return None
        from lmshrink.io import save
        from lmshrink.models import LoadedModel

        origin = self._lmshrink_origin
        loaded = LoadedModel(self, origin["family"], origin["tokenizer"], origin["source"], compression=origin["compression"])
        # Like transformers, writing into the same directory again replaces it; save() still refuses foreign folders.
        return save(loaded, save_directory, overwrite=True)


@functools.cache
def _saving_class(base: type) -> type:
    # Same name as the base class: pipelines and other tools that check the class name see the architecture they know.
    return type(base.__name__, (_SavesAsLmshrink, base), {"__module__": __name__, "__doc__": base.__doc__})


def as_transformers(loaded) -> torch.nn.Module:
    """The transformers model inside ``loaded`` (what lmshrink.load returned), made to save as an lmshrink directory.

    It is the same object: factorized modules inside, ``generate``, ``pipeline``, ``.to()`` as for any transformers
    model; only ``save_pretrained`` changes (a plain save would write factors under a dense model's config).
    """
    model = loaded.model
    if not isinstance(model, _SavesAsLmshrink):
        model.__class__ = _saving_class(type(model))
    model._lmshrink_origin = {"family": loaded.family, "tokenizer": loaded.tokenizer, "source": loaded.source,
                              "compression": loaded.compression}
    return model


# What transformers' Auto classes pass along; none changes what a local lmshrink directory holds.
_PASSED_THROUGH = {"trust_remote_code", "adapter_kwargs", "_from_auto", "_from_pipeline", "revision", "cache_dir",
                   "force_download", "local_files_only", "proxies", "token", "code_revision", "low_cpu_mem_usage",
                   "use_safetensors"}


def parse_dtype(value) -> torch.dtype | None:
    if value is None or value == "auto":
        return None
    if isinstance(value, torch.dtype):
        return value
    dtype = getattr(torch, str(value).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise InvalidArgument("dtype", f"{value!r} is not a torch dtype", "float32, bfloat16, float16, 'auto'")
    return dtype


def _device(device_map) -> torch.device | None:
    """One device for the whole model: lmshrink's factorized layers are not split across devices."""
    if device_map is None:
        return None
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if len(devices) != 1:
            raise InvalidArgument("device_map", f"{device_map!r} splits the model across devices",
                                  "one device: 'cpu', 'cuda', 'cuda:N', {'': device}, or 'auto'")
        device_map = devices.pop()
    if device_map in ("auto", "balanced", "sequential"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    try:
        return torch.device(device_map)
    except (RuntimeError, TypeError) as error:
        raise InvalidArgument("device_map", f"{device_map!r} is not a device", "'cpu', 'cuda', 'cuda:N', {'': device}, or 'auto'") from error


class _LmshrinkAutoModel:
    """What transformers' Auto classes find for model type "lmshrink": ``from_pretrained`` delegates to lmshrink.load."""

    config_class = LmshrinkConfig
    causal = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        from lmshrink.io import load

        if model_args:
            raise InvalidArgument("from_pretrained", "positional model arguments are not supported for lmshrink models", "keyword options")
        dtype = parse_dtype(kwargs.pop("dtype", kwargs.pop("torch_dtype", None)))
        device = _device(kwargs.pop("device_map", None))
        attention = kwargs.pop("attn_implementation", None)
        subfolder = kwargs.pop("subfolder", "") or ""
        unknown = sorted(set(kwargs) - _PASSED_THROUGH)
        if unknown:
            raise InvalidArgument("from_pretrained", f"options {unknown} are not supported for lmshrink models",
                                  "dtype, device_map (one device), attn_implementation, and the Hub options transformers passes")
        path = Path(pretrained_model_name_or_path).expanduser() / subfolder
        if not path.is_dir():
            raise NotAModel(f"MODEL: {str(path)!r} is not a local directory; lmshrink models load from a saved directory")
        loaded = load(path)
        if loaded.causal != cls.causal:
            kind, auto = ("a causal language model", "AutoModelForCausalLM") if loaded.causal else ("an encoder", "AutoModel")
            raise NotAModel(f"MODEL: {str(path)!r} holds {kind}; load it with {auto}.from_pretrained")
        model = as_transformers(loaded)
        if attention is not None:
            model.set_attn_implementation(attention)
        if dtype is not None or device is not None:
            model.to(device=device, dtype=dtype)
        return model

    @classmethod
    def _from_config(cls, config, **kwargs):
        raise NotAModel("MODEL: an lmshrink model is rebuilt from its saved directory (factor shapes live in lmshrink.json); "
                        "use from_pretrained(DIR)")

    from_config = _from_config


class LmshrinkForCausalLM(_LmshrinkAutoModel):
    causal = True


class LmshrinkModel(_LmshrinkAutoModel):
    causal = False


def register() -> None:
    """Register model type "lmshrink" with transformers' AutoConfig, AutoModelForCausalLM and AutoModel (idempotent)."""
    AutoConfig.register(MODEL_TYPE, LmshrinkConfig, exist_ok=True)
    AutoModelForCausalLM.register(LmshrinkConfig, LmshrinkForCausalLM, exist_ok=True)
    AutoModel.register(LmshrinkConfig, LmshrinkModel, exist_ok=True)


@torch.no_grad()
def generate_text(loaded, prompt: str, max_new_tokens: int = 32) -> str:
    """Greedy continuation of ``prompt`` (the new text only) with transformers' own ``generate``."""
    if not loaded.causal:
        raise InvalidArgument("MODEL", f"{loaded.source!r} is an encoder", "a causal language model (generation needs next-token logits)")
    if loaded.tokenizer is None:
        raise NotAModel(f"MODEL: {loaded.source!r} has no tokenizer; generation needs one")
    tokenizer, model = loaded.tokenizer, loaded.model
    batch = tokenizer(prompt, return_tensors="pt").to(model.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad if pad is not None else 0)
    return tokenizer.decode(output[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
