"""Plans, surgery and save/load on small random models (structure, bad input, atomic writes)."""

import json

import pytest
import torch

import lmshrink
from lmshrink.errors import CorruptFile, DataError, InvalidArgument, NotAModel
from tests.conftest import saved_weights, tiny_gpt2, tiny_llama


def logits(loaded, seed=0):
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return loaded.logits(ids)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"ratio": 0.0}, r"--ratio: 0.0 is outside \(0, 1\]"),
        ({"ratio": 1.5}, r"--ratio: 1.5 is outside"),
        ({"energy": 0.0}, r"--energy"),
        ({"energy": 1.01}, r"--energy"),
        ({"rank": 0}, r"--rank: 0 is not a positive integer"),
        ({}, r"exactly one of --ratio R, --rank K, --energy E or --params N"),
        ({"ratio": 0.5, "rank": 3}, r"ratio and rank given"),
    ],
)
def test_plan_rejects_bad_amounts(kwargs, message):
    with pytest.raises(InvalidArgument, match=message):
        lmshrink.Plan(**kwargs)


def test_rank_above_min_dimension_names_the_matrix():
    loaded = tiny_llama()
    with pytest.raises(InvalidArgument, match=r"--rank \(for model.layers.0.self_attn.k_proj, 32x64\).*1\.\.32"):
        lmshrink.compress(loaded, lmshrink.Plan(rank=40), progress=False)


def test_unknown_target_lists_close_matches():
    loaded = tiny_llama()
    with pytest.raises(InvalidArgument, match=r"--targets: pattern 'atention' matches no module.*close matches: attention"):
        lmshrink.compress(loaded, lmshrink.Plan(ratio=0.5, targets=("atention",)), progress=False)


def test_targets_by_group_and_glob():
    loaded = tiny_llama()
    names = lambda patterns: [t.name for t in lmshrink.plan.select_targets(loaded.candidates(), patterns)]
    attention = names(("attention",))
    assert len(attention) == 8 and all("self_attn" in n for n in attention)
    assert names(("*.down_proj",)) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert len(names(("linears",))) == 14
    assert names(("lm_head",)) == ["lm_head"]
    assert names(("embedding",)) == ["model.embed_tokens"]


def test_ratio_keeps_at_most_that_fraction_and_dense_when_not_smaller():
    loaded = tiny_llama()
    report = lmshrink.compress(loaded, lmshrink.Plan(ratio=0.5), progress=False)
    for row in report.modules:
        assert row["status"] == "factorized"
        assert row["params_after"] <= 0.5 * row["params_before"]
    loaded = tiny_llama()
    report = lmshrink.compress(loaded, lmshrink.Plan(ratio=1.0), progress=False)
    for row in report.modules:
        m, n = row["shape"]
        # square matrices break even exactly at ratio 1 (k = n/2), so they stay dense; others shrink a little
        assert (row["status"] == "dense (not smaller)") == (m == n)
        assert row["params_after"] <= row["params_before"]
    loaded = tiny_llama()
    report = lmshrink.compress(loaded, lmshrink.Plan(ratio=1.0, targets=("*.q_proj", "*.o_proj")), progress=False)
    assert report.params_after == report.params_before and report.notes


def test_energy_plan_reaches_the_energy():
    loaded = tiny_llama()
    report = lmshrink.compress(loaded, lmshrink.Plan(energy=0.5, targets=("*.q_proj",)), progress=False)
    for row in report.modules:
        # relative error^2 = energy lost < 0.5
        assert row["relative_error"] ** 2 <= 0.5 + 1e-6


def test_tied_gpt2_roundtrip_keeps_tie_and_logits(tmp_path):
    loaded = tiny_gpt2(tie=True)
    report = lmshrink.compress(loaded, lmshrink.Plan(ratio=0.6, targets=("linears", "embedding"), multiple_of=4), progress=False)
    model = loaded.model
    assert type(model.transformer.wte).__name__ == "LowRankEmbedding"
    assert type(model.lm_head).__name__ == "TiedHead" and model.lm_head.embedding is model.transformer.wte
    assert all(r["rank"] % 4 == 0 for r in report.compressed)
    # params counted once although the head shares the embedding's factors
    assert report.params_after == sum(p.numel() for p in model.parameters())
    expected = logits(loaded)
    lmshrink.save(loaded, tmp_path / "out")
    again = lmshrink.load(tmp_path / "out")
    assert again.model.lm_head.embedding is again.model.transformer.wte
    got = logits(again)
    assert torch.linalg.norm(got - expected) / torch.linalg.norm(expected) <= 1e-5
    manifest = json.loads((tmp_path / "out" / "lmshrink.json").read_text())
    assert manifest["modules"]["transformer.wte"]["layer"] == "LowRankEmbedding"
    assert manifest["modules"]["lm_head"]["config"]["embedding"] == "transformer.wte"


def test_untied_llama_roundtrip(tmp_path):
    loaded = tiny_llama(tie=False)
    lmshrink.compress(loaded, lmshrink.Plan(ratio=0.7, targets=("linears", "lm_head")), progress=False)
    expected = logits(loaded)
    lmshrink.save(loaded, tmp_path / "m")
    got = logits(lmshrink.load(tmp_path / "m"))
    assert torch.linalg.norm(got - expected) / torch.linalg.norm(expected) <= 1e-5


def test_corrupted_and_truncated_weights_are_reported(tmp_path):
    loaded = tiny_llama()
    lmshrink.compress(loaded, lmshrink.Plan(ratio=0.5), progress=False)
    path = lmshrink.save(loaded, tmp_path / "m")
    weights = saved_weights(path)
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFile, match="truncated or corrupted"):
        lmshrink.load(path)
    weights.write_bytes(b"\xff" * 64 + data[64:])
    with pytest.raises(CorruptFile, match="truncated or corrupted"):
        lmshrink.load(path)


def test_manifest_from_newer_lmshrink_is_refused(tmp_path):
    loaded = tiny_llama()
    path = lmshrink.save(loaded, tmp_path / "m")
    manifest = json.loads((path / "lmshrink.json").read_text())
    manifest.update(format_version=99, lmshrink_version="9.0.0")
    (path / "lmshrink.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptFile, match=r"written by lmshrink 9.0.0 \(format 99\).*upgrade lmshrink"):
        lmshrink.load(path)


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    import lmshrink.io

    loaded = tiny_llama()

    def explode(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lmshrink.io, "write_manifest", explode)  # the shards are written by then
    with pytest.raises(KeyboardInterrupt):
        lmshrink.save(loaded, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_to_overwrite_foreign_directory(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(InvalidArgument, match="--out"):
        lmshrink.save(tiny_llama(), tmp_path, overwrite=True)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_paths_that_are_not_models(tmp_path):
    with pytest.raises(NotAModel, match="neither a path nor a built-in name"):
        lmshrink.load_model(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(NotAModel, match="is not a model"):
        lmshrink.load_model(tmp_path / "notes.txt")
    with pytest.raises(NotAModel, match="is not a model"):
        lmshrink.load_model(tmp_path)


def test_text_too_short_for_one_window(tmp_path):
    from lmshrink.data import token_windows

    with pytest.raises(DataError, match="too short for one window of 512"):
        token_windows(list(range(100)), 512)
    short = tmp_path / "short.txt"
    short.write_text("just a few words\n" * 3)
    corpus = lmshrink.load_corpus(short)
    assert corpus.train and corpus.test and corpus.train + corpus.test == short.read_text()


def test_default_corpus_without_shared_data_is_english_prose_and_stdlib_stays_available(monkeypatch, tmp_path):
    import lmshrink.data

    monkeypatch.setattr(lmshrink.data, "shared_data_dir", lambda: None)
    assert lmshrink.load_corpus().name == "pydoc"
    corpus = lmshrink.load_corpus("stdlib")
    assert corpus.name == "python-stdlib" and "standard library" in corpus.source
    assert len(corpus.train) > 1_000_000 and len(corpus.test) > 100_000
    assert "def " in corpus.test and corpus.train[-1] == "\n"  # split at a line break, no overlap


_LOAD_CHILD = """
import resource, sys
import torch
import lmshrink
small, big, headroom = sys.argv[1], sys.argv[2], int(sys.argv[3])
lmshrink.load(small)  # every module the load path imports, imported before measuring
torch.set_num_threads(1)
data = int(next(line for line in open("/proc/self/status") if line.startswith("VmData")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_DATA, (data + headroom, data + headroom))
try:
    loaded = lmshrink.load(big)
except (MemoryError, RuntimeError, OSError) as error:
    print("FAILED", type(error).__name__, str(error).splitlines()[0][:200])
    sys.exit(3)
print("DONE", sum(p.numel() for p in loaded.model.parameters()))
"""


def test_load_never_holds_the_weights_twice(tmp_path):
    """lmshrink.load allocates the model once and reads the stored tensors into it one at a time: it runs in a process
    allowed to grow by 1.4x the weights (an OS-enforced limit); holding every stored tensor before copying them in
    would need 2x."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import byte_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=512, max_position_embeddings=128)
    big = lmshrink.load_model(LlamaForCausalLM(config).eval(), tokenizer=byte_tokenizer())
    weight_bytes = sum(p.numel() * p.element_size() for p in big.model.parameters())
    assert weight_bytes > 80e6
    lmshrink.save(big, tmp_path / "big")
    lmshrink.save(tiny_llama(), tmp_path / "small")
    del big
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(lmshrink.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
           "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed buffers go back to the OS: what is measured is what the code holds
    done = subprocess.run([sys.executable, "-c", _LOAD_CHILD, str(tmp_path / "small"), str(tmp_path / "big"),
                           str(int(1.4 * weight_bytes))], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and f"DONE {weight_bytes // 4}" in done.stdout, done.stdout + done.stderr[-2000:]
