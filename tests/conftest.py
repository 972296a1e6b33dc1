"""Shared fixtures. Real models come through lmshrink's own loader (fetched once into the cache).
Real text is English prose that lmshrink gets by itself (``prose``: the 'pydoc' corpus, on every machine);
only tests of figures recorded on WikiText-2 / PTB use the shared data folder (../shared/data, or
LMSHRINK_DATA), and they skip, saying why, where it is absent (CI has it)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import lmshrink
from lmshrink.data import shared_data_dir

torch.set_num_threads(2)


def require_shared(why: str):
    """The shared data folder, or a skip that says which figure needs it (``why``)."""
    folder = shared_data_dir()
    if folder is None or not (folder / "wikitext-2" / "test.txt").is_file() or not (folder / "ptb").is_dir():
        pytest.skip(f"no shared corpora (../shared/data or LMSHRINK_DATA with wikitext-2/ and ptb/): {why}")
    return folder


@pytest.fixture(scope="session")
def prose():
    """English prose every Python carries (Python's reference manual topics): see lmshrink.data.pydoc_corpus."""
    return lmshrink.load_corpus("pydoc")


@pytest.fixture(scope="session")
def smollm2_pristine():
    """SmolLM2-135M as loaded from its GGUF; never modify it (use ``smollm2``)."""
    return lmshrink.load_model("smollm2-135m")


@pytest.fixture
def smollm2(smollm2_pristine):
    """A private copy of SmolLM2-135M that a test may compress."""
    return lmshrink.LoadedModel(copy.deepcopy(smollm2_pristine.model), smollm2_pristine.family,
                                smollm2_pristine.tokenizer, smollm2_pristine.source)


@pytest.fixture(scope="session")
def minilm_pristine():
    return lmshrink.load_model("minilm-l6")


@pytest.fixture
def minilm(minilm_pristine):
    return lmshrink.LoadedModel(copy.deepcopy(minilm_pristine.model), minilm_pristine.family,
                                minilm_pristine.tokenizer, minilm_pristine.source)


def tiny_gpt2(tie: bool = True, seed: int = 0):
    """A small random GPT-2 (Conv1D layers, tied embeddings): fast structural tests without downloads."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=48, n_head=4, vocab_size=300, n_positions=64, tie_word_embeddings=tie)
    return lmshrink.load_model(GPT2LMHeadModel(config).eval())


def byte_tokenizer():
    """A byte-level tokenizer with exactly 256 tokens (one per byte), so tiny models can read real text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(["byte level"], trainers.BpeTrainer(vocab_size=256, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def tiny_llama(seed: int = 0, tie: bool = False):
    """A small random LLaMA (nn.Linear layers) with a byte tokenizer, saved-and-loaded like a real one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, tie_word_embeddings=tie)
    return lmshrink.load_model(LlamaForCausalLM(config).eval(), tokenizer=byte_tokenizer())


def saved_weights(folder) -> Path:
    """The one weights shard of a small model saved by lmshrink (model-00001-of-00001.safetensors)."""
    shards = sorted(Path(folder).glob("model-*-of-*.safetensors"))
    assert len(shards) == 1, shards
    return shards[0]


def invoke_cli(folder: Path, *args: str):
    """Run lmshrink's CLI in ``folder`` (in-process, click's runner) and return the result; asserts nothing."""
    import os

    from click.testing import CliRunner

    from lmshrink.cli import main

    old = os.getcwd()
    os.chdir(folder)
    try:
        return CliRunner().invoke(main, list(args))
    finally:
        os.chdir(old)


def tiny_gemma3(folder: Path) -> Path:
    """A small random Gemma 3 saved as a Hugging Face directory: per-layer attention types (sliding and full, two
    rotary tables), a scaled word embedding (lookups times sqrt(64)) tied to the head, soft-capped logits."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=128, sliding_window=8,
                              layer_types=["sliding_attention", "full_attention", "sliding_attention"], final_logit_softcapping=30.0)
    Gemma3ForCausalLM(config).save_pretrained(folder, max_shard_size="60KB")
    byte_tokenizer().save_pretrained(folder)
    return folder
