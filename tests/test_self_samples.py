"""Calibration text sampled from the model itself ('self', 'TEXT+self'): what is sampled, its cache, and its mix."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import lmshrink
from conftest import tiny_gpt2, tiny_llama
from lmshrink.data import calibration_windows, encode_prefix, model_windows, with_self_share
from lmshrink.errors import InvalidArgument
from lmshrink.self_samples import BATCH, sampled_windows, samples_cache_dir

WINDOW = 24


@pytest.fixture
def model():
    return tiny_llama(seed=1)


@pytest.fixture(autouse=True)
def _own_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LMSHRINK_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LMSHRINK_NO_STATS_CACHE", raising=False)


def test_samples_follow_the_model_and_start_from_a_random_ordinary_token(model):
    favoured = 97
    # Push one token's logit far above the rest: every sampled token after the first must be it.
    hook = model.model.lm_head.register_forward_hook(lambda module, args, out: out + 50 * torch.nn.functional.one_hot(
        torch.tensor(favoured), out.shape[-1]).to(out.dtype))
    try:
        ids = sampled_windows(model, 2 * BATCH, WINDOW)
    finally:
        hook.remove()
    assert ids.shape == (2 * BATCH, WINDOW) and ids.dtype == torch.long
    assert bool((ids[:, 1:] == favoured).all())
    assert len(set(ids[:, 0].tolist())) > BATCH  # first tokens drawn at random, not all alike
    assert not set(ids[:, 0].tolist()) & set(model.tokenizer.all_special_ids)


def test_samples_are_deterministic_prefix_consistent_cached_and_leave_the_rng_alone(model, monkeypatch):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    few = sampled_windows(model, 5, WINDOW)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is untouched
    files = list(samples_cache_dir().glob("*.safetensors"))
    assert len(files) == 1
    more = sampled_windows(model, BATCH + 3, WINDOW)  # one more batch sampled, the first read back
    assert torch.equal(more[:5], few) and not torch.equal(more[BATCH:BATCH + 3], more[:3])

    import lmshrink.self_samples as module

    def refuse(*args):
        raise AssertionError("sampled again although cached")

    monkeypatch.setattr(module, "_sample_batch", refuse)
    assert torch.equal(sampled_windows(model, BATCH + 3, WINDOW), more)
    monkeypatch.undo()
    monkeypatch.setenv("LMSHRINK_NO_STATS_CACHE", "1")  # uncached: sampled afresh, the same tokens
    assert torch.equal(sampled_windows(model, BATCH + 3, WINDOW), more)
    assert not torch.equal(sampled_windows(model, 5, WINDOW, seed=1), few)


def test_a_damaged_cache_file_is_sampled_again(model):
    first = sampled_windows(model, 4, WINDOW)
    (path,) = samples_cache_dir().glob("*.safetensors")
    path.write_bytes(path.read_bytes()[:40])
    assert torch.equal(sampled_windows(model, 4, WINDOW), first)


def test_a_changed_model_samples_anew(model):
    first = sampled_windows(model, 4, WINDOW)
    with torch.no_grad():
        model.model.model.layers[0].mlp.down_proj.weight.mul_(3)
    assert not torch.equal(sampled_windows(model, 4, WINDOW), first)
    assert len(list(samples_cache_dir().glob("*.safetensors"))) == 2


def test_text_plus_self_mixes_half_and_half(model, prose):
    mixed = lmshrink.load_corpus("pydoc+self")
    assert (mixed.name, mixed.sampled, mixed.test) == ("pydoc+self", 0.5, prose.test) and "sampled" in mixed.source
    ids = calibration_windows(model, mixed, 7, WINDOW)
    text = model_windows(model, encode_prefix(model, prose.train, 4 * WINDOW), WINDOW, 4)
    assert ids.shape == (7, WINDOW)
    assert torch.equal(ids[:4], text) and torch.equal(ids[4:], sampled_windows(model, 3, WINDOW))
    alone = lmshrink.load_corpus("self")
    assert alone.sampled == 1.0 and not alone.train and not alone.test
    assert torch.equal(calibration_windows(model, alone, 3, WINDOW), sampled_windows(model, 3, WINDOW))


def test_a_plans_self_share_mixes_the_calibration_as_the_data_spec_does(model, prose):
    """Plan.self_share (a recipe stage's ``self_share``) sets the share whatever --data says; None keeps the data's."""
    assert with_self_share(prose, None) is prose
    eighth = with_self_share(prose, 0.125)
    assert (eighth.name, eighth.sampled, eighth.train) == ("pydoc+self:0.125", 0.125, prose.train)
    ids = calibration_windows(model, eighth, 8, WINDOW)
    assert torch.equal(ids[:7], model_windows(model, encode_prefix(model, prose.train, 7 * WINDOW), WINDOW, 7))
    assert torch.equal(ids[7:], sampled_windows(model, 1, WINDOW))
    assert with_self_share(lmshrink.load_corpus("pydoc+self"), 0).name == "pydoc"

    def compressed(plan, data):
        loaded = tiny_llama(seed=1)
        lmshrink.compress(loaded, plan, data=data, progress=False)
        return loaded.model.state_dict()

    plan = lmshrink.Plan(method="svdllm", ratio=0.5, calibration_windows=4, window=WINDOW)
    by_spec = compressed(plan, "pydoc+self")
    by_plan = compressed(dataclasses.replace(plan, self_share=0.5), prose)
    text_only = compressed(dataclasses.replace(plan, self_share=0.0), "pydoc+self")
    assert all(torch.equal(by_spec[name], by_plan[name]) for name in by_spec)
    assert any(not torch.equal(by_spec[name], text_only[name]) for name in by_spec)
    with pytest.raises(InvalidArgument, match="--self-share: 0.5 leaves windows to text, but --data 'self' has none"):
        lmshrink.compress(tiny_llama(), dataclasses.replace(plan, self_share=0.5), data="self", progress=False)
    for bad in (-0.1, 1.5, "half", True):
        with pytest.raises(InvalidArgument, match="--self-share: .* is not a share"):
            lmshrink.Plan(method="svdllm", ratio=0.5, self_share=bad)


def test_self_only_calibrates(model, tmp_path):
    plan = lmshrink.Plan(method="svdllm", ratio=0.5, calibration_windows=4, window=WINDOW)
    report = lmshrink.compress(model, plan, data="self", progress=False)  # calibration only: fine
    assert report.compressed
    with pytest.raises(InvalidArgument, match="--data: 'self' has no evaluation text"):
        lmshrink.run_compress(tiny_llama(), plan, data="self")
    with pytest.raises(InvalidArgument, match="corpus: 'self' has no training text"):
        lmshrink.finetune(model, "self", steps=1, window=WINDOW, progress=False)
    with pytest.raises(InvalidArgument, match="--data: 'self' has no text to count tokens in"):
        lmshrink.compress(tiny_llama(), lmshrink.Plan(method="groupreduce", ratio=0.5, targets=("embedding",)), data="self",
                          progress=False)
    with pytest.raises(InvalidArgument, match="--data: 'nowhere.txt' does not exist"):
        lmshrink.load_corpus("nowhere.txt+self")


def test_sampling_refuses_a_model_it_cannot_sample_from():
    loaded = tiny_gpt2()  # no tokenizer: its samples could not become text for the calibration windows' model
    with pytest.raises(InvalidArgument, match="--data: 'self' samples calibration text from the model"):
        sampled_windows(loaded, 2, 8)
