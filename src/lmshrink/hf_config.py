"""config.json of a saved lmshrink directory: lmshrink's own ``model_type`` with the base model's config inside
(see lmshrink.hf_compat for why). Reading and writing it is here, apart from the transformers Auto-class glue
(hf_compat), so that the Hugging Face family (models/hf.py) can use it without depending on lmshrink.io.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

from lmshrink.errors import CorruptFile

MODEL_TYPE = "lmshrink"
CONFIG = "config.json"
# The classes hf_compat registers with transformers' Auto classes (named in config.json "architectures").
CAUSAL_ARCHITECTURE = "LmshrinkForCausalLM"
ENCODER_ARCHITECTURE = "LmshrinkModel"
HOW_TO_LOAD = ("a model compressed by lmshrink: its safetensors shards hold factorized layers, not the base model's dense weights. "
               "Load it with `import lmshrink` and then AutoModelForCausalLM.from_pretrained(DIR) (AutoModel for encoders), "
               "or lmshrink.load(DIR); `lmshrink export DIR --dense --out OUT` writes a plain Hugging Face checkpoint")
# Not a dtype. A model class used directly (LlamaForCausalLM.from_pretrained(saved_dir)) skips the model-type check and
# would build the class's default config (7B parameters for LLaMA) with random weights; every transformers config class
# rejects this value while parsing config.json, quoting it in the error. lmshrink's own config drops it.
REFUSAL = ("lmshrink: a compressed model, not loadable by this transformers class; `import lmshrink`, then "
           "AutoModelForCausalLM.from_pretrained(DIR) (AutoModel for encoders) or lmshrink.load(DIR)")


class LmshrinkConfig(PretrainedConfig):
    """config.json of a saved lmshrink directory: {"model_type": "lmshrink", "lmshrink": {"base_config": {...}, ...}}."""

    model_type = MODEL_TYPE

    def __init__(self, lmshrink: dict[str, Any] | None = None, **kwargs):
        self.lmshrink = dict(lmshrink or {})
        for key in ("dtype", "torch_dtype"):
            if kwargs.get(key) == REFUSAL:
                del kwargs[key]
        super().__init__(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "dtype": REFUSAL}

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
    architecture = CAUSAL_ARCHITECTURE if causal else ENCODER_ARCHITECTURE
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
