"""GroupReduce: the block math, the block layers, the method through compress/save/load, and its errors."""

from __future__ import annotations

import pytest
import torch

import lmshrink
from conftest import tiny_llama
from lmshrink.accounting import count_bytes
from lmshrink.decompose.groupreduce import (
    allocate_group_ranks,
    budget_for_ratio,
    frequency_weights,
    groupreduce,
    split_by_frequency,
    weighted_basis,
    weighted_error,
)
from lmshrink.decompose.svd import truncated_svd
from lmshrink.errors import InvalidArgument
from lmshrink.frequencies import Frequencies, count_tokens
from lmshrink.layers.block import BlockLowRankEmbedding, BlockLowRankOutput


# The frequencies come from a table file in these tests, so the calibration text is never read.
NO_TEXT = lmshrink.Corpus("none", "unused", "unused", "inline placeholder")


def zipf_counts(vocab: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    counts = (1e6 / torch.arange(1, vocab + 1, dtype=torch.float64) ** 1.1).round() + 1
    return counts[torch.randperm(vocab, generator=generator)]


def frequency_structured_table(vocab: int = 600, dim: int = 32, seed: int = 0):
    """Rows whose subspace depends on frequency, as in real embeddings: frequent and rare tokens live apart."""
    generator = torch.Generator().manual_seed(seed)
    counts = zipf_counts(vocab, seed)
    order = torch.argsort(counts, descending=True)
    table = torch.empty(vocab, dim)
    bases = [torch.linalg.qr(torch.randn(dim, dim, generator=generator))[0][:, :6].T for _ in range(3)]
    for part, ids in enumerate(order.chunk(3)):
        table[ids] = torch.randn(ids.numel(), 6, generator=generator) @ bases[part]
    table += 0.05 * torch.randn(vocab, dim, generator=generator)
    return table, counts


def test_weighted_basis_is_the_optimum_of_the_weighted_objective():
    generator = torch.Generator().manual_seed(1)
    block = torch.randn(80, 12, generator=generator, dtype=torch.float64)
    weights = torch.rand(80, generator=generator, dtype=torch.float64) * 10
    basis, _ = weighted_basis(block, weights, 4)
    assert torch.allclose(basis @ basis.T, torch.eye(4, dtype=torch.float64), atol=1e-10)

    def objective(v):
        return float((weights * ((block - block @ v.T @ v) ** 2).sum(1)).sum())

    best = objective(basis)
    # The unweighted SVD basis and random orthonormal bases are never better.
    _, _, vh = torch.linalg.svd(block, full_matrices=False)
    assert best <= objective(vh[:4]) + 1e-9
    for _ in range(5):
        q = torch.linalg.qr(torch.randn(12, 4, generator=generator, dtype=torch.float64))[0].T
        assert best <= objective(q) + 1e-9


def test_split_is_by_frequency_and_covers_the_vocabulary():
    counts = zipf_counts(1000)
    for scheme in ("equal", "geometric"):
        groups = split_by_frequency(counts, 5, scheme)
        assert sorted(torch.cat(groups).tolist()) == list(range(1000))
        minimum_of_previous = float("inf")
        for ids in groups:  # every token of an earlier group is at least as frequent as any later one
            assert counts[ids].max() <= minimum_of_previous
            minimum_of_previous = counts[ids].min()
    assert [g.numel() for g in split_by_frequency(counts, 4, "equal")] == [250] * 4
    sizes = [g.numel() for g in split_by_frequency(counts, 4, "geometric")]
    assert sizes == sorted(sizes) and sizes[0] < 100 < sizes[-1]


def test_ranks_follow_frequency_and_fill_but_never_exceed_the_budget():
    sizes, dim, budget = [100, 200, 300], 32, 9000
    ranks = allocate_group_ranks(sizes, dim, budget, group_weights=[50.0, 5.0, 1.0], rule="frequency")
    used = sum(r * (n + dim) for r, n in zip(ranks, sizes))
    assert used <= budget and budget - used < min(n + dim for n in sizes) + max(n + dim for n in sizes)
    assert ranks[0] > ranks[1] >= ranks[2] >= 1
    spectra = [torch.linspace(10, 1, 32), torch.linspace(5, 0.5, 32), torch.linspace(1, 0.1, 32)]
    greedy = allocate_group_ranks(sizes, dim, budget, spectra=spectra, rule="greedy")
    assert sum(r * (n + dim) for r, n in zip(greedy, sizes)) <= budget and greedy[0] > greedy[2]


def test_groupreduce_beats_svd_at_equal_parameters_and_refinement_helps():
    table, counts = frequency_structured_table()
    vocab, dim = table.shape
    budget = budget_for_ratio((vocab, dim), 0.35)
    weights = frequency_weights(counts, 0.5)
    rank = budget // (vocab + dim)
    left, right = truncated_svd(table, rank)
    svd_error = weighted_error(table, weights, left @ right)
    plain = groupreduce(table, counts, budget, groups=3, refine_steps=0)
    refined = groupreduce(table, counts, budget, groups=3, refine_steps=8)
    for factors in (plain, refined):
        assert factors.params() <= budget
        assert sorted(torch.cat(factors.groups).tolist()) == list(range(vocab))
    plain_error = weighted_error(table, weights, plain.reconstruct())
    refined_error = weighted_error(table, weights, refined.reconstruct())
    assert plain_error < svd_error
    assert refined_error <= plain_error + 1e-9
    assert refined.history[0]["weighted_error"] == pytest.approx(plain_error, rel=1e-6)
    assert len(refined.history) >= 2


def test_bad_input_is_rejected_with_the_argument_named():
    table, counts = frequency_structured_table(vocab=60, dim=8)
    with pytest.raises(InvalidArgument, match="groups"):
        groupreduce(table, counts, 400, groups=61)
    with pytest.raises(InvalidArgument, match="counts"):
        groupreduce(table, counts[:-1], 400, groups=3)
    with pytest.raises(InvalidArgument, match=r"ranks\[1\]"):
        groupreduce(table, counts, 0, groups=3, ranks=[2, 9, 2])  # groups of 20 tokens x 8 columns allow rank <= 8
    with pytest.raises(InvalidArgument, match="budget"):
        groupreduce(table, counts, 10, groups=3)
    with pytest.raises(InvalidArgument, match="frequencies"):
        count_tokens(torch.tensor([0, 1, 2]), 3).check_vocab(60)
    with pytest.raises(InvalidArgument, match="ids"):
        count_tokens(torch.tensor([0, 5]), 3)


def test_explicit_ranks_are_used():
    table, counts = frequency_structured_table(vocab=60, dim=8)
    factors = groupreduce(table, counts, 0, groups=3, ranks=[5, 3, 1], refine_steps=0)
    assert factors.ranks == [5, 3, 1]


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_block_layers_match_their_factors_and_reload(bits):
    table, counts = frequency_structured_table(vocab=300, dim=24)
    factors = groupreduce(table, counts, budget_for_ratio((300, 24), 0.4), groups=4, refine_steps=2)
    embedding = BlockLowRankEmbedding.from_factors(factors, bits=bits)
    head = BlockLowRankOutput.from_factors(factors, bits=bits, bias=True)
    dense = embedding.dense_weight()
    if bits is None:
        assert torch.allclose(dense, factors.reconstruct(), atol=1e-5)
    else:  # quantized factors: close to the float ones, and really stored as packed integers
        error = float((dense - factors.reconstruct()).norm() / factors.reconstruct().norm())
        assert error < (0.02 if bits == 8 else 0.2)
        assert count_bytes(embedding) < count_bytes(BlockLowRankEmbedding.from_factors(factors)) * (bits / 32 + 0.25)
    ids = torch.randint(0, 300, (2, 9))
    assert torch.allclose(embedding(ids), dense[ids], atol=1e-5)
    hidden = torch.randn(2, 5, 24)
    assert torch.allclose(embedding.logits(hidden), hidden @ dense.T, atol=1e-4)
    assert torch.allclose(head(hidden), hidden @ dense.T + head.bias, atol=1e-4)
    again = BlockLowRankEmbedding.from_config(embedding.layer_config(), None)
    again.load_state_dict(embedding.state_dict())
    assert torch.equal(again(ids), embedding(ids))
    assert count_bytes(again) == count_bytes(embedding)
    with pytest.raises(IndexError, match=r"\[0, 300\)"):
        embedding(torch.tensor([300]))


def _zipf_table(vocab: int, tmp_path) -> str:
    weights = 1 / torch.arange(1, vocab + 1, dtype=torch.float64)
    ids = torch.multinomial(weights, 20000, replacement=True, generator=torch.Generator().manual_seed(0))
    return str(count_tokens(ids, vocab, "synthetic zipf").save(tmp_path / "counts.json"))


@pytest.mark.parametrize("tie", [False, True])
def test_compress_save_load_tiny_llama(tie, tmp_path):
    loaded = tiny_llama(tie=tie)
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    table = _zipf_table(256, tmp_path)
    plan = lmshrink.Plan(method="groupreduce", targets=("embedding", "lm_head"), ratio=0.4,
                         options={"frequencies": table, "groups": 4, "refine_steps": 3})
    report = lmshrink.compress(loaded, plan, data=NO_TEXT, progress=False)
    layers = {m["name"]: m["layer"] for m in report.compressed}
    assert layers["model.embed_tokens"] == "BlockLowRankEmbedding"
    if tie:
        assert type(loaded.model.lm_head).__name__ == "TiedHead" and "lm_head" not in layers
    else:
        assert layers["lm_head"] == "BlockLowRankOutput"
    assert report.bytes_after < report.bytes_before
    logits = loaded.logits(ids)
    lmshrink.save(loaded, tmp_path / "model")
    again = lmshrink.load(tmp_path / "model")
    assert torch.equal(again.logits(ids), logits)
    stored = again.manifest["modules"]["model.embed_tokens"]["config"]["frequencies"]
    assert Frequencies.from_dict(stored).counts.equal(Frequencies.load(table).counts)


def test_frequency_table_for_another_vocabulary_is_rejected(tmp_path):
    loaded = tiny_llama()
    plan = lmshrink.Plan(method="groupreduce", targets=("embedding",), ratio=0.4,
                         options={"frequencies": _zipf_table(300, tmp_path)})
    with pytest.raises(InvalidArgument, match="300 entries"):
        lmshrink.compress(loaded, plan, data=NO_TEXT, progress=False)


def test_bits_outside_the_supported_set_are_rejected(tmp_path):
    loaded = tiny_llama()
    plan = lmshrink.Plan(method="groupreduce", targets=("embedding",), ratio=0.4,
                         options={"frequencies": _zipf_table(256, tmp_path), "bits": 7})
    with pytest.raises(InvalidArgument, match="--bits"):
        lmshrink.compress(loaded, plan, data=NO_TEXT, progress=False)


def test_frequencies_counted_with_the_models_tokenizer(smollm2_pristine, prose):
    from lmshrink.frequencies import corpus_frequencies

    table = corpus_frequencies(smollm2_pristine, prose.train[:200_000], 49152, name="pydoc train head")
    ids = smollm2_pristine.encode(prose.train[:200_000])
    assert table.tokens == len(ids)
    the = smollm2_pristine.encode(" the")[0]
    assert int(table.counts[the]) == ids.count(the) and int(table.counts.argmax()) in ids
    assert float(table.smoothed().min()) == 1.0  # unseen tokens get the smoothing constant
