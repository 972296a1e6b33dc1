"""Tensor-train embeddings: TT-SVD (batched, checked against TensorLy), TT-matrices, the layers, the methods."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import lmshrink
from lmshrink.decompose.tt import (
    balanced_factorization,
    padded_factorization,
    parse_shape,
    tt_matrix_reconstruct,
    tt_matrix_rows,
    tt_matrix_svd,
    tt_reconstruct,
    tt_svd,
    tt_svd_batched,
)
from lmshrink.errors import InvalidArgument
from lmshrink.layers.lowrank import TiedHead
from lmshrink.layers.tt import TTEmbedding, TTMatrixEmbedding
from lmshrink.plan import Plan
from tests.conftest import tiny_llama

tl = pytest.importorskip("tensorly")
from tensorly.decomposition import tensor_train, tensor_train_matrix  # noqa: E402


def low_tt_rank_rows(count: int, shape, ranks, seed: int = 0) -> torch.Tensor:
    """Random rows that are exact tensor trains of the given ranks (float64), plus nothing else."""
    generator = torch.Generator().manual_seed(seed)
    cores = [torch.randn(count, ranks[k], n, ranks[k + 1], generator=generator, dtype=torch.float64)
             for k, n in enumerate(shape)]
    from lmshrink.decompose.tt import tt_reconstruct_batched

    return tt_reconstruct_batched(cores)


# ------------------------------------------------------------------------------------------------ shapes


@pytest.mark.parametrize("n,order,expected", [(576, 3, (8, 8, 9)), (49152, 3, (32, 32, 48)), (384, 3, (6, 8, 8)),
                                              (768, 4, (4, 4, 6, 8)), (64, 3, (4, 4, 4))])
def test_balanced_factorization(n, order, expected):
    assert balanced_factorization(n, order) == expected


def test_padded_factorization_of_a_badly_factoring_vocabulary():
    factors = padded_factorization(30522, 3)  # MiniLM: 30522 = 2 x 3 x 5087
    assert 30522 <= math.prod(factors) <= 30522 * 1.01 and max(factors) <= 2 * min(factors)
    assert padded_factorization(49152, 3) == (32, 32, 48)  # factors well: no padding


def test_parse_shape_and_its_errors():
    assert parse_shape("8x8x9", 576) == (8, 8, 9) and parse_shape([8, 72], 576) == (8, 72)
    with pytest.raises(InvalidArgument, match=r"--tt-shape: 8x8x8 multiplies to 512, not 576.*8x8x9"):
        parse_shape("8x8x8", 576, "--tt-shape")
    with pytest.raises(InvalidArgument, match="not a list of integers"):
        parse_shape("8xeightx9", 576)
    with pytest.raises(InvalidArgument, match="not a positive integer"):
        parse_shape([0, 576], 576)


# ------------------------------------------------------------------------------------------------ TT-SVD


@pytest.mark.parametrize("solver", ["svd", "gram"])
@pytest.mark.parametrize("shape,rank", [((4, 5, 6), 3), ((3, 4, 2, 5), 2), ((8, 8, 9), 4)])
def test_batched_tt_svd_matches_tensorly_row_by_row(solver, shape, rank):
    generator = torch.Generator().manual_seed(1)
    rows = torch.randn(20, math.prod(shape), generator=generator, dtype=torch.float64)
    trains = tt_svd_batched(rows, shape, max_rank=rank, solver=solver)
    rebuilt = trains.reconstruct()
    tl.set_backend("numpy")
    for i in range(rows.shape[0]):
        expected_ranks = [1] + [min(rank, math.prod(shape[:k]), math.prod(shape[k:])) for k in range(1, len(shape))] + [1]
        cores = tensor_train(rows[i].numpy().reshape(shape), rank=expected_ranks)
        reference = torch.from_numpy(tl.tt_to_tensor(cores).reshape(-1))
        assert torch.allclose(rebuilt[i], reference, atol=1e-8), (i, (rebuilt[i] - reference).abs().max())
        assert trains.ranks[i].tolist() == expected_ranks
    # The truncation really truncates: random rows are far from rank-`rank` trains.
    assert (rebuilt - rows).norm() > 0.1 * rows.norm()


def test_gram_solver_through_the_jacobi_kernel_matches_tensorly_and_lapack(monkeypatch):
    from lmshrink.decompose import small_eigh

    pytest.importorskip("numba")
    shape, rank = (8, 8, 9), 4
    rows = torch.randn(small_eigh.JACOBI_MIN_BATCH + 44, 576, generator=torch.Generator().manual_seed(6),
                       dtype=torch.float64)
    assert small_eigh.uses_jacobi(torch.zeros(rows.shape[0], 8, 8, dtype=torch.float64))
    rebuilt = tt_svd_batched(rows, shape, max_rank=rank, solver="gram").reconstruct()
    tl.set_backend("numpy")
    for i in range(0, rows.shape[0], 15):
        cores = tensor_train(rows[i].numpy().reshape(shape), rank=[1, rank, rank, 1])
        assert torch.allclose(rebuilt[i], torch.from_numpy(tl.tt_to_tensor(cores).reshape(-1)), atol=1e-8)
    monkeypatch.setattr(small_eigh, "jacobi_kernel", lambda: None)
    assert torch.allclose(tt_svd_batched(rows, shape, max_rank=rank, solver="gram").reconstruct(), rebuilt, atol=1e-10)


@pytest.mark.parametrize("solver", ["svd", "gram"])
def test_full_rank_trains_are_exact(solver):
    rows = torch.randn(7, 60, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    trains = tt_svd_batched(rows, (3, 4, 5), solver=solver)
    assert torch.allclose(trains.reconstruct(), rows, atol=1e-10)
    assert trains.padded_ranks == (1, 3, 5, 1)


def test_gram_solver_on_several_threads_equals_one_thread():
    from lmshrink.decompose import small_eigh

    rows = torch.randn(small_eigh.PARALLEL_MIN_BATCH + 5, 24, generator=torch.Generator().manual_seed(3))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = tt_svd_batched(rows, (2, 3, 4), max_rank=2, solver="gram")
        torch.set_num_threads(3)  # uneven chunks: the pieces must come back in order
        shared = tt_svd_batched(rows, (2, 3, 4), max_rank=2, solver="gram")
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(alone.cores, shared.cores))


@pytest.mark.parametrize("solver", ["svd", "gram"])
def test_tolerance_gives_each_row_its_own_minimal_ranks(solver):
    shape = (4, 5, 6)
    # Rows of true TT-ranks (1,1), (2,2) and (3,4): the tolerance must find exactly these, row by row.
    rows = torch.cat([low_tt_rank_rows(5, shape, (1, 1, 1, 1), 3), low_tt_rank_rows(5, shape, (1, 2, 2, 1), 4),
                      low_tt_rank_rows(5, shape, (1, 3, 4, 1), 5)])
    trains = tt_svd_batched(rows, shape, tolerance=1e-6, solver=solver)
    assert trains.ranks[:, 1:3].tolist() == [[1, 1]] * 5 + [[2, 2]] * 5 + [[3, 4]] * 5
    assert torch.allclose(trains.reconstruct(), rows, atol=1e-8 * rows.abs().max())
    assert trains.padded_ranks == (1, 3, 4, 1)
    own = 5 * (4 + 5 + 6) + 5 * (8 + 20 + 12) + 5 * (12 + 60 + 24)
    assert trains.parameter_count() == own and trains.stored_parameter_count() == 15 * (12 + 60 + 24)
    # Padding is zeros: every row's padded train equals its own TT-SVD.
    for i in (0, 7):
        single = tt_svd(rows[i].reshape(shape), tolerance=1e-6)
        assert [c.shape[-1] for c in single][:-1] == trains.ranks[i, 1:-1].tolist()
        assert torch.allclose(tt_reconstruct(single).reshape(-1), trains.reconstruct()[i], atol=1e-9)


def test_delta_truncation_error_bound_and_per_row_ranks():
    rows = torch.randn(200, 72, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    rows = rows @ torch.randn(72, 72, dtype=torch.float64, generator=torch.Generator().manual_seed(7)).triu()
    counts = []
    for eps in (0.1, 0.3, 0.6):
        trains = tt_svd_batched(rows, (2, 6, 6), tolerance=eps)
        error = (trains.reconstruct() - rows).norm(dim=1) / rows.norm(dim=1)
        assert error.max() <= eps + 1e-9  # Oseledets' bound, row by row
        counts.append(trains.parameter_count())
        for i in (0, 50, 199):  # the same ranks as a TT-SVD of that row alone
            single = tt_svd(rows[i].reshape(2, 6, 6), tolerance=eps)
            assert [1] + [c.shape[-1] for c in single] == trains.ranks[i].tolist()
    assert counts[0] > counts[1] > counts[2]


def test_tt_svd_of_one_tensor_matches_tensorly():
    tensor = torch.randn(3, 4, 5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    cores = tt_svd(tensor, max_rank=[2, 3, 2])
    assert [tuple(c.shape) for c in cores] == [(1, 3, 2), (2, 4, 3), (3, 5, 2), (2, 2, 1)]
    tl.set_backend("numpy")
    reference = tl.tt_to_tensor(tensor_train(tensor.numpy(), rank=[1, 2, 3, 2, 1]))
    assert torch.allclose(tt_reconstruct(cores), torch.from_numpy(reference), atol=1e-10)


@pytest.mark.parametrize("kwargs,message", [
    ({"max_rank": 0}, "max_rank: 0 is not a positive integer"),
    ({"max_rank": -2}, "max_rank: -2"),
    ({"max_rank": [2]}, "one per TT bond"),
    ({"tolerance": 0.0}, "tolerance: 0.0 is outside (0, 1)"),
    ({"tolerance": 1.0}, "tolerance: 1.0 is outside (0, 1)"),
    ({"tolerance": -0.5}, "tolerance: -0.5 is outside (0, 1)"),
])
def test_bad_rank_and_tolerance(kwargs, message):
    with pytest.raises(InvalidArgument) as error:
        tt_svd_batched(torch.randn(3, 24), (2, 3, 4), **kwargs)
    assert message in str(error.value)


def test_bad_shapes_and_inputs():
    with pytest.raises(InvalidArgument, match="multiplies to 20, not 24"):
        tt_svd_batched(torch.randn(3, 24), (4, 5))
    with pytest.raises(InvalidArgument, match="vectors: has 1 dimensions"):
        tt_svd_batched(torch.randn(24), (4, 6))
    with pytest.raises(InvalidArgument, match="row_shape: 4x4 multiplies to 16, not 12"):
        tt_matrix_svd(torch.randn(12, 6), (4, 4), (2, 3))
    with pytest.raises(InvalidArgument, match="orders 2 and 3 differ"):
        tt_matrix_svd(torch.randn(12, 8), (3, 4), (2, 2, 2))


# -------------------------------------------------------------------------------------------- TT-matrix


def test_tt_matrix_matches_tensorly_and_rows_match_the_matrix():
    generator = torch.Generator().manual_seed(9)
    matrix = torch.randn(60, 24, dtype=torch.float64, generator=generator)
    row_shape, col_shape = (3, 4, 5), (2, 3, 4)
    exact = tt_matrix_svd(matrix, row_shape, col_shape)
    assert torch.allclose(tt_matrix_reconstruct(exact), matrix, atol=1e-10)
    cores = tt_matrix_svd(matrix, row_shape, col_shape, max_rank=4)
    assert [tuple(c.shape) for c in cores] == [(1, 3, 2, 4), (4, 4, 3, 4), (4, 5, 4, 1)]
    tl.set_backend("numpy")
    tensor = matrix.numpy().reshape(*row_shape, *col_shape)
    reference = tl.tt_matrix_to_tensor(tensor_train_matrix(tensor, rank=[1, 4, 4, 1])).reshape(60, 24)
    approx = tt_matrix_reconstruct(cores)
    assert torch.allclose(approx, torch.from_numpy(reference), atol=1e-9)
    ids = torch.tensor([0, 17, 59, 31, 31])
    assert torch.allclose(tt_matrix_rows(cores, ids), approx[ids], atol=1e-12)


# --------------------------------------------------------------------------------------------- layers


def test_tt_embedding_lookup_logits_cache_and_bad_ids():
    weight = low_tt_rank_rows(50, (4, 4, 4), (1, 3, 3, 1), 10).float() + 0.01 * torch.randn(50, 64)
    layer = TTEmbedding.from_embedding(torch.nn.Embedding.from_pretrained(weight), (4, 4, 4), max_rank=3)
    table = layer.dense_weight()
    assert table.shape == (50, 64) and (table - weight).norm() / weight.norm() < 0.05
    ids = torch.tensor([[0, 3, 49], [7, 7, 1]])
    assert torch.allclose(layer(ids), table[ids], atol=1e-6)
    hidden = torch.randn(2, 5, 64)
    with torch.no_grad():
        chunked = layer.logits(hidden)
        layer.cache_dense = True
        layer.eval()
        cached = layer.logits(hidden)
        assert layer._cached_table is not None
    assert torch.allclose(chunked, hidden @ table.T, atol=1e-4) and torch.allclose(cached, chunked, atol=1e-5)
    layer.load_state_dict(layer.state_dict())  # new weights: the cache must go
    assert layer._cached_table is None
    for bad in (torch.tensor([50]), torch.tensor([-1])):
        with pytest.raises(IndexError, match=r"token ids must lie in \[0, 50\)"):
            layer(bad)
    assert layer.compression_rate() == pytest.approx(50 * 64 / (50 * (4 * 3 + 3 * 4 * 3 + 3 * 4)))


def test_tt_matrix_embedding_pads_a_vocabulary_and_refuses_padding_rows():
    weight = torch.randn(61, 24)  # 61 is prime: the table is padded to a TT-matrix of V' >= 61 rows
    cores = tt_matrix_svd(torch.cat([weight, torch.zeros(3, 24)]), (4, 4, 4), (2, 3, 4))
    layer = TTMatrixEmbedding.from_cores(cores, 61)
    assert torch.allclose(layer.dense_weight(), weight, atol=1e-5)
    assert torch.allclose(layer(torch.tensor([60, 0])), weight[[60, 0]], atol=1e-5)
    with pytest.raises(IndexError):
        layer(torch.tensor([61]))


# ------------------------------------------------------------------------------------- methods, tied head


@pytest.mark.parametrize("method,options,layer_type", [
    ("tt", {"tt_max_rank": 2}, TTEmbedding),
    ("tt", {"tt_tolerance": 0.7, "tt_shape": "4x16"}, TTEmbedding),
    ("tt-matrix", {"tt_max_rank": 6}, TTMatrixEmbedding),
])
def test_compress_tied_embedding_logits_and_roundtrip(method, options, layer_type, tmp_path):
    loaded = tiny_llama(tie=True)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    report = lmshrink.compress(loaded, Plan(method=method, targets=("embedding",), rank=3, options=options), progress=False)
    row = report.modules[0]
    assert row["status"] == "factorized" and row["tied_head"] == "lm_head"
    embedding, head = loaded.model.model.embed_tokens, loaded.model.lm_head
    assert isinstance(embedding, layer_type) and isinstance(head, TiedHead) and head.embedding is embedding
    assert row["params_after"] == embedding.stored_parameters() < 256 * 64
    assert report.params_before - report.params_after == 256 * 64 - embedding.stored_parameters()  # head counted once
    with torch.no_grad():
        logits = loaded.logits(ids)
        # The same model with a dense table equal to the rebuilt one gives the same logits.
        dense = tiny_llama(tie=True)
        dense.model.model.embed_tokens.weight.copy_(embedding.dense_weight())
        state = {k: v for k, v in loaded.model.state_dict().items() if "embed_tokens" not in k and "lm_head" not in k}
        dense.model.load_state_dict(state, strict=False)
        assert torch.allclose(logits, dense.logits(ids), atol=1e-4)
    lmshrink.save(loaded, tmp_path / "m")
    again = lmshrink.load_model(tmp_path / "m")
    assert type(again.model.model.embed_tokens) is layer_type
    assert again.model.lm_head.embedding is again.model.model.embed_tokens
    with torch.no_grad():
        assert torch.equal(again.logits(ids), logits)


def test_untie_head_compresses_the_input_side_only(tmp_path):
    original = tiny_llama(tie=True)
    table = original.model.model.embed_tokens.weight.detach().clone()
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    loaded = tiny_llama(tie=True)
    report = lmshrink.compress(loaded, Plan(method="tt", targets=("embedding",), rank=2, untie_head=True), progress=False)
    embedding, head = loaded.model.model.embed_tokens, loaded.model.lm_head
    assert isinstance(embedding, TTEmbedding) and type(head) is torch.nn.Linear
    assert torch.equal(head.weight, table) and loaded.model.config.tie_word_embeddings is False
    # The head's table is now counted on its own: the model grows by the TT parameters.
    assert report.params_after - report.params_before == embedding.stored_parameters()
    assert any(note.startswith("--untie-head: lm_head keeps its own dense copy") for note in report.notes)
    with torch.no_grad():
        logits = loaded.logits(ids)
        # Same as the original model fed the rebuilt rows at its input, with the original output layer.
        dense = tiny_llama(tie=False)
        dense.model.load_state_dict({k: v for k, v in original.model.state_dict().items()})
        dense.model.model.embed_tokens.weight.copy_(embedding.dense_weight())
        assert torch.allclose(logits, dense.logits(ids), atol=1e-4)
        assert not torch.allclose(logits, original.logits(ids), atol=1e-2)  # the input side did change
    lmshrink.save(loaded, tmp_path / "m")
    again = lmshrink.load_model(tmp_path / "m")
    assert type(again.model.lm_head) is torch.nn.Linear and torch.equal(again.model.lm_head.weight, table)
    with torch.no_grad():
        assert torch.equal(again.logits(ids), logits)


def test_ratio_plan_and_its_limits():
    loaded = tiny_llama(tie=True)
    report = lmshrink.compress(loaded, Plan(method="tt", targets=("embedding",), ratio=0.8), progress=False)
    layer = loaded.model.model.embed_tokens
    # Per token: rank 2 holds 4*2 + 2*4*2 + 2*4 = 32 of 64 (0.5 <= 0.8); rank 3 would hold 60 (0.94 > 0.8).
    assert layer.ranks == (1, 2, 2, 1) and report.modules[0]["params_after"] == 256 * 32
    with pytest.raises(InvalidArgument, match=r"--ratio: 0.01 is below what a per-token train .* reaches even at TT rank 1"):
        lmshrink.compress(tiny_llama(tie=True), Plan(method="tt", targets=("embedding",), ratio=0.01), progress=False)
    with pytest.raises(InvalidArgument, match="--tt-shape: 8x9 multiplies to 72, not 64"):
        lmshrink.compress(tiny_llama(tie=True), Plan(method="tt", targets=("embedding",), rank=2,
                                                      options={"tt_shape": "8x9"}), progress=False)
    with pytest.raises(InvalidArgument, match="--tt-tolerance: 1.5 is outside"):
        lmshrink.compress(tiny_llama(tie=True), Plan(method="tt", targets=("embedding",), rank=2,
                                                      options={"tt_tolerance": 1.5}), progress=False)
    with pytest.raises(InvalidArgument, match="cannot compress"):
        lmshrink.compress(tiny_llama(tie=True), Plan(method="tt", targets=("attention",), rank=2), progress=False)


def test_cli_tt_method_options(tmp_path):
    folder = tmp_path / "llama"
    lmshrink.save(tiny_llama(tie=True), folder)
    text = tmp_path / "text.txt"
    text.write_text("hello world, this is text\n" * 200)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    base = [sys.executable, "-m", "lmshrink", "compress", str(folder), "--data", str(text), "--tokens", "64",
            "--window", "16", "--targets", "embedding", "--method", "tt", "--rank", "2"]
    done = subprocess.run(base + ["--tt-shape", "4x4x4", "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert lmshrink.io.read_manifest(tmp_path / "out")["modules"]["model.embed_tokens"]["config"]["ranks"] == [1, 2, 2, 1]


# ---------------------------------------------------------------------------------------------- real model


def test_smollm2_embedding_per_token_tt(smollm2):
    """All 49152 SmolLM2 rows in one batched TT-SVD: TensorLy agrees row by row, the rate is the paper's count."""
    weight = smollm2.model.get_input_embeddings().weight.detach().clone()
    ids = torch.tensor([smollm2.encode("The tower is 324 metres tall, about the same height as an 81-storey building.")])
    with torch.no_grad():
        report = lmshrink.compress(smollm2, Plan(method="tt", targets=("embedding",), rank=4, options={"tt_shape": "8x8x9"}),
                                   progress=False)
        layer = smollm2.model.get_input_embeddings()
        assert isinstance(layer, TTEmbedding) and isinstance(smollm2.model.lm_head, TiedHead)
        assert layer.tt_parameters() == layer.stored_parameters() == 49152 * (8 * 4 + 4 * 8 * 4 + 4 * 9)
        assert layer.compression_rate() == pytest.approx(576 / 196)
        rebuilt = layer.dense_weight()
        assert report.modules[0]["relative_error"] == pytest.approx(float((rebuilt - weight).norm() / weight.norm()), abs=1e-5)
        tl.set_backend("numpy")
        for i in (0, 1, 1000, 30000, 49151):
            reference = tl.tt_to_tensor(tensor_train(weight[i].double().numpy().reshape(8, 8, 9), rank=[1, 4, 4, 1]))
            assert torch.allclose(rebuilt[i].double(), torch.from_numpy(reference).reshape(-1), atol=1e-4)
        assert torch.allclose(layer(ids[0]), rebuilt[ids[0]], atol=1e-6)
        logits = smollm2.logits(ids)
        hidden = smollm2.model.model(input_ids=ids).last_hidden_state
        assert torch.allclose(logits, hidden @ rebuilt.T, atol=1e-3)
