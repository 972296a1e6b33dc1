"""Windows as the model reads text: a BOS first where the tokenizer prepends one (Gemma), plain windows otherwise."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import lmshrink
from lmshrink.data import Corpus, calibration_windows, model_windows
from lmshrink.evaluate import greedy_sample, perplexity

from conftest import byte_tokenizer, tiny_llama

TEXT = "The quick brown fox jumps over the lazy dog. " * 40


def _with_bos():
    """A tiny LLaMA whose tokenizer prepends <bos> (id 256) to every text, as Gemma's does."""
    from tokenizers import processors
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_tokenizer()
    tokenizer.add_special_tokens({"bos_token": "<bos>"})
    bos = tokenizer.convert_tokens_to_ids("<bos>")
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=300, max_position_embeddings=128)
    return lmshrink.load_model(LlamaForCausalLM(config).eval(), tokenizer=tokenizer), bos


def test_a_model_whose_tokenizer_prepends_bos_reads_windows_that_start_with_it():
    loaded, bos = _with_bos()
    assert loaded.leading_token == bos
    ids = loaded.encode(TEXT)
    assert bos not in ids  # encode() gives the text's own tokens
    windows = calibration_windows(loaded, Corpus("t", TEXT, TEXT, "t"), count=3, window=32)
    assert windows.shape == (3, 32) and (windows[:, 0] == bos).all()
    assert windows[:, 1:].reshape(-1).tolist() == ids[: 3 * 31]  # the text continues across windows, none skipped


def test_perplexity_scores_every_text_token_after_the_bos():
    loaded, bos = _with_bos()
    ids = loaded.encode(TEXT)[:4 * 31]
    result = perplexity(loaded, ids, window=32, progress=False)
    total = 0.0
    with torch.no_grad():
        for chunk in torch.tensor(ids).view(4, 31):
            row = torch.cat([torch.tensor([bos]), chunk])
            logits = loaded.model(input_ids=row[None]).logits[0, :-1]
            total += F.cross_entropy(logits, row[1:], reduction="sum").item()
    assert result["tokens"] == 4 * 31 and result["windows"] == 4
    assert math.isclose(result["nll"], total / (4 * 31), rel_tol=1e-6)


def test_a_model_without_bos_keeps_plain_windows():
    loaded = tiny_llama()
    assert loaded.leading_token is None
    ids = loaded.encode(TEXT)[:64]
    assert torch.equal(model_windows(loaded, ids, 32), torch.tensor(ids).view(2, 32))


def test_greedy_sample_starts_from_the_bos():
    loaded, bos = _with_bos()
    with torch.no_grad():
        prompt = [bos, *loaded.encode("The quick")]
        expected = loaded.model.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert greedy_sample(loaded, "The quick", 5) == loaded.tokenizer.decode(expected[0, len(prompt):]).replace("\n", " ")
