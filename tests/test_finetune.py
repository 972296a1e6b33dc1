"""Refinement training of a compressed model's factors (or all parameters) on corpus windows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lmshrink
from conftest import tiny_llama
from lmshrink.data import encode_prefix, token_windows
from lmshrink.errors import InvalidArgument
from lmshrink.finetune import finetune, trainable_parameters


class CharTokenizer:
    """Bytes as token ids: enough of a tokenizer for a 256-token tiny model to read real text."""

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": list(text.encode("utf-8"))}


def tiny_llama_with_text(tie: bool = False):
    loaded = tiny_llama(tie=tie)
    loaded.tokenizer = CharTokenizer()
    return loaded


def _loss(loaded, windows) -> float:
    with torch.no_grad():
        logits = loaded.logits(windows)
        return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)))


def test_finetune_trains_only_the_factors_and_lowers_the_loss(prose):
    loaded = tiny_llama_with_text()
    plan = lmshrink.Plan(method="svd", targets=("lm_head", "model.layers.1.mlp.down_proj"), ratio=0.3)
    lmshrink.compress(loaded, plan, progress=False)
    before = {name: p.detach().clone() for name, p in loaded.model.named_parameters()}
    factors = trainable_parameters(loaded.model, "factors")
    assert set(factors) == {f"{m}.{p}" for m in ("lm_head", "model.layers.1.mlp.down_proj") for p in ("left", "right")}
    windows = token_windows(encode_prefix(loaded, prose.train, 12 * 64), 64)
    loss_before = _loss(loaded, windows)
    report = finetune(loaded, prose, steps=12, lr=1e-2, window=64, progress=False, evaluate_tokens=320)
    loss_after = _loss(loaded, windows)
    assert report["steps"] == 12 and len(report["losses"]) == 12 and report["tokens"] == 12 * 64
    assert loss_after < loss_before - 0.3, (loss_before, loss_after)
    # Held-out text improves too (a random model learns the byte statistics of English).
    assert report["after"]["perplexity"] < report["before"]["perplexity"]
    for name, p in loaded.model.named_parameters():
        changed = not torch.equal(p.detach(), before[name])
        assert changed == (name in factors), name
        assert p.requires_grad  # flags restored
    assert not loaded.model.training


def test_finetune_all_parameters_on_a_block_embedding(prose, tmp_path):
    from lmshrink.frequencies import corpus_frequencies

    loaded = tiny_llama_with_text(tie=True)
    table = corpus_frequencies(loaded, prose.train[:100_000], 256, name="pydoc head").save(tmp_path / "f.json")
    plan = lmshrink.Plan(method="groupreduce", targets=("embedding",), ratio=0.3,
                         options={"frequencies": str(table), "groups": 4, "refine_steps": 2})
    lmshrink.compress(loaded, plan, progress=False)
    assert set(trainable_parameters(loaded.model, "factors")) == {
        f"model.embed_tokens.{side}.{g}" for side in ("lefts", "rights") for g in range(4)}
    norm = loaded.model.model.norm.weight.detach().clone()
    windows = token_windows(encode_prefix(loaded, prose.train, 10 * 64), 64)
    loss_before = _loss(loaded, windows)
    finetune(loaded, prose, steps=10, lr=1e-2, window=64, train="all", progress=False)
    assert _loss(loaded, windows) < loss_before
    assert not torch.equal(loaded.model.model.norm.weight.detach(), norm)  # "all" trains outside the factors too


def test_finetune_by_name_patterns_trains_exactly_the_matching_dense_weights(prose):
    loaded = tiny_llama_with_text()  # nothing factorized: the uncompressed control of a refinement run
    patterns = ("model.layers.*.mlp.*_proj.weight",)
    chosen = trainable_parameters(loaded.model, patterns)
    assert chosen and all(".mlp." in name for name in chosen)
    before = {name: p.detach().clone() for name, p in loaded.model.named_parameters()}
    report = finetune(loaded, prose, steps=3, lr=1e-2, window=64, train=patterns, progress=False)
    assert report["train"] == list(patterns) and report["trained_parameters"] == sum(p.numel() for p in chosen.values())
    for name, p in loaded.model.named_parameters():
        assert (not torch.equal(p.detach(), before[name])) == (name in chosen), name


def _kl_to(teacher, student, windows) -> float:
    with torch.no_grad():
        target = F.log_softmax(teacher.logits(windows), -1)
        return float(F.kl_div(F.log_softmax(student.logits(windows), -1), target, log_target=True, reduction="sum")
                     / windows.numel())


def test_distillation_pulls_the_compressed_model_toward_its_teacher(prose):
    import copy

    teacher = tiny_llama_with_text()
    student = lmshrink.LoadedModel(copy.deepcopy(teacher.model), teacher.family, teacher.tokenizer)
    lmshrink.compress(student, lmshrink.Plan(method="svd", targets=("mlp",), ratio=0.2), progress=False)
    windows = token_windows(encode_prefix(student, prose.test, 4 * 64), 64)  # held-out text
    before = _kl_to(teacher, student, windows)
    teacher_before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    report = finetune(student, prose, steps=15, lr=3e-3, window=64, teacher=teacher, progress=False)
    assert report["loss"].startswith("distillation")
    assert _kl_to(teacher, student, windows) < 0.7 * before, (before, _kl_to(teacher, student, windows))
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.model.state_dict().items())  # teacher untouched
    with pytest.raises(InvalidArgument, match="teacher"):
        finetune(student, prose, steps=1, window=64, teacher=student)


def test_finetune_rejects_bad_arguments(prose):
    loaded = tiny_llama_with_text()
    with pytest.raises(InvalidArgument, match="train"):
        finetune(loaded, prose, steps=1, train="embeddings")
    with pytest.raises(InvalidArgument, match="steps"):
        finetune(loaded, prose, steps=0)
    with pytest.raises(InvalidArgument, match="selects no trainable"):
        finetune(loaded, prose, steps=1, window=16)  # nothing factorized yet
    with pytest.raises(InvalidArgument, match="selects no trainable"):
        finetune(loaded, prose, steps=1, window=16, train=("no.such.*",))


def test_quantized_factors_are_not_trainable():
    loaded = tiny_llama(tie=True)
    plan = lmshrink.Plan(method="quantize", targets=("embedding",), ratio=1.0, options={"bits": 8})
    lmshrink.compress(loaded, plan, progress=False)
    assert trainable_parameters(loaded.model, "factors") == {}
    assert len(trainable_parameters(loaded.model, "all")) > 0
