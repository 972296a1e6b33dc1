"""Tensor sources (safetensors shards, GGUF), the sharded writer, and filling meta-device skeletons."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import pytest
import torch

from conftest import tiny_llama
from lmshrink.errors import CorruptFile
from lmshrink.models.blocks import build_skeleton
from lmshrink.shards import INDEX_FILE, SafetensorsSource, ShardWriter, fill, materialize, open_source, release


def _save(model, folder: Path, shard: str | None = "40KB") -> Path:
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    return folder


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(seed=1)


def test_sharded_source_lists_from_headers_and_reads_each_tensor(llama, tmp_path):
    folder = _save(llama.model, tmp_path / "m")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 2 and (folder / INDEX_FILE).is_file()
    source = SafetensorsSource(folder)
    state = llama.model.state_dict()
    assert set(source.names()) == set(state) - {"lm_head.weight"} or set(source.names()) == set(state)
    for name in source.names():
        assert source.shape(name) == tuple(state[name].shape) and source.dtype(name) == torch.float32
        assert torch.equal(source.get(name), state[name])
    half = source.get("model.layers.0.mlp.up_proj.weight", dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half, state["model.layers.0.mlp.up_proj.weight"].bfloat16())
    assert source.declared_dtype() == torch.float32


def test_get_into_a_tensor_reads_in_place_or_casts(llama, tmp_path):
    """``get(name, out=t)``: into a tensor of the stored dtype the bytes land in t's own memory (fill's route: no second
    copy of a table); into another dtype or a non-contiguous view the values are cast and copied."""
    source = SafetensorsSource(_save(llama.model, tmp_path / "m"))
    name = "model.layers.0.mlp.up_proj.weight"
    expected = llama.model.state_dict()[name]
    out = torch.nn.Parameter(torch.full(expected.shape, float("nan")))  # fill's targets are parameters
    pointer = out.data_ptr()
    assert source.get(name, out=out) is out and out.data_ptr() == pointer and torch.equal(out.detach(), expected)
    half = torch.zeros(expected.shape, dtype=torch.bfloat16)
    source.get(name, out=half)
    assert torch.equal(half, expected.bfloat16())
    strided = torch.zeros(expected.shape[1], expected.shape[0]).T
    source.get(name, out=strided)
    assert torch.equal(strided, expected)


def test_single_file_source(llama, tmp_path):
    folder = _save(llama.model, tmp_path / "m", shard=None)
    assert (folder / "model.safetensors").is_file()
    source = open_source(folder)
    assert torch.equal(source.get("model.norm.weight"), llama.model.model.norm.weight)


def test_missing_shard_is_named(llama, tmp_path):
    folder = _save(llama.model, tmp_path / "m")
    victim = sorted(folder.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CorruptFile, match=f"shard '{victim.name}'.*missing"):
        SafetensorsSource(folder)


def test_truncated_shard_is_named(llama, tmp_path):
    folder = _save(llama.model, tmp_path / "m")
    victim = sorted(folder.glob("model-*.safetensors"))[2]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 100])
    with pytest.raises(CorruptFile, match=f"shard '{victim.name}' is truncated"):
        SafetensorsSource(folder)
    victim.write_bytes(data[:5])
    with pytest.raises(CorruptFile, match=f"shard '{victim.name}' is truncated"):
        SafetensorsSource(folder)


def test_index_naming_absent_tensor(llama, tmp_path):
    folder = _save(llama.model, tmp_path / "m")
    index = json.loads((folder / INDEX_FILE).read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"]["model.layers.9.mlp.gate_proj.weight"] = shard
    (folder / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CorruptFile, match=f"names tensor 'model.layers.9.mlp.gate_proj.weight' in shard '{shard}'"):
        SafetensorsSource(folder)


def test_writer_layout_is_what_transformers_loads(llama, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "w"
    writer = ShardWriter(folder, torch.bfloat16)
    state = llama.model.state_dict()
    for index in range(2):
        writer.add({k: v for k, v in state.items() if k.startswith(f"model.layers.{index}.")})
        writer.end_shard()
    writer.add({k: v for k, v in state.items() if not k.startswith("model.layers.")})
    paths = writer.close()
    assert [p.name for p in paths] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert sorted(p.name for p in folder.iterdir()) == sorted([p.name for p in paths] + [INDEX_FILE])  # no temporary left
    index = json.loads((folder / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(state) and index["metadata"]["total_size"] == sum(v.numel() * 2 for v in state.values())
    llama.model.config.save_pretrained(folder)
    again = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    for name, tensor in again.state_dict().items():
        assert torch.equal(tensor, state[name].bfloat16().float()), name


def test_writer_writes_tied_tensors_once_and_size_limit_splits(tmp_path):
    shared = torch.randn(8, 4)
    writer = ShardWriter(tmp_path / "w", max_shard_bytes=200)
    writer.add({"a.weight": shared, "b.weight": shared, "c": torch.randn(20), "d": torch.arange(3)})
    paths = writer.close()
    index = json.loads((tmp_path / "w" / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == {"a.weight", "c", "d"} and len(paths) == 2
    source = SafetensorsSource(tmp_path / "w")
    assert source.dtype("d") == torch.int64 and torch.equal(source.get("a.weight"), shared)


def test_fill_is_strict_and_keeps_ties_and_buffers(tmp_path):
    tied = tiny_llama(seed=2, tie=True)
    folder = _save(tied.model, tmp_path / "t")
    source = SafetensorsSource(folder)
    skeleton = build_skeleton(tied.model.config, torch.float32)
    assert skeleton.lm_head.weight is skeleton.model.embed_tokens.weight and skeleton.lm_head.weight.is_meta
    inv_freq = skeleton.model.rotary_emb.inv_freq.clone()
    materialize(skeleton, "cpu")
    fill(skeleton, source)
    assert skeleton.lm_head.weight is skeleton.model.embed_tokens.weight
    assert torch.equal(skeleton.model.rotary_emb.inv_freq, inv_freq)
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert torch.equal(skeleton(input_ids=ids).logits, tied.model(input_ids=ids).logits)
    release(skeleton)
    assert all(p.is_meta for p in skeleton.parameters()) and skeleton.lm_head.weight is skeleton.model.embed_tokens.weight

    untied = build_skeleton(tiny_llama(seed=3).model.config, torch.float32)  # has its own lm_head.weight: missing here
    materialize(untied, "cpu")
    with pytest.raises(CorruptFile, match=r"lacks 1 tensor.*lm_head.weight"):
        fill(untied, source)
    small = build_skeleton(tied.model.config.__class__(**{**tied.model.config.to_dict(), "num_hidden_layers": 1}), torch.float32)
    materialize(small, "cpu")
    with pytest.raises(CorruptFile, match=r"does not have.*model.layers.1"):
        fill(small, source)


@pytest.mark.slow
def test_gguf_source_equals_transformers_loading():
    """Every tensor of the real SmolLM2 GGUF, read one at a time, equals what from_pretrained(gguf_file=) loads."""
    from transformers import AutoModelForCausalLM

    from lmshrink.models.builtin import fetch_builtin

    path = fetch_builtin("smollm2-135m")
    source = open_source(path)
    assert source.declared_dtype() == torch.bfloat16
    reference = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).state_dict()
    names = source.names()
    assert "lm_head.weight" not in names and len(names) == len(reference) - 1  # tied head: one tensor in the file
    for name in names:
        assert torch.equal(source.get(name), reference[name]), name


def test_a_weights_file_that_cannot_be_mapped_for_lack_of_memory_is_not_called_corrupt(tmp_path):
    # Measured (benchmarks/sequential_large.py): under RLIMIT_DATA safetensors fails with "unable to mmap ... bytes";
    # that is memory running out, and the user must hear so (and what fits), not that the file is damaged.
    from lmshrink.errors import CorruptFile, OutOfMemory
    from lmshrink.safefiles import refuse_unreadable

    mapped = refuse_unreadable(RuntimeError("unable to mmap 2163388448 bytes from file </m/model-00001-of-00002.safetensors>: "
                                            "Cannot allocate memory (os error 12)"), "weights file", tmp_path / "w.safetensors")
    assert isinstance(mapped, OutOfMemory) and isinstance(mapped, MemoryError) and "--sequential" in str(mapped)
    damaged = refuse_unreadable(RuntimeError("Error while deserializing header: HeaderTooLarge"), "weights file", tmp_path / "w")
    assert isinstance(damaged, CorruptFile) and "truncated or corrupted" in str(damaged)


_FRAGMENTED_HEAP = """
import torch
from lmshrink.shards import return_freed_memory
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024
x = torch.ones(4 << 20, dtype=torch.uint8); del x  # freeing an mmapped chunk raises glibc's mmap threshold past 4 MB
start = rss()
tensors = [torch.ones(512 * 1024) for _ in range(100)]  # 2 MB each, now from the heap
kept = tensors[::10]; del tensors  # 180 MB freed between live chunks: not at the heap's top, so kept resident
before = rss(); return_freed_memory(); after = rss()
print(before - start, after - start)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists() or platform.libc_ver()[0] != "glibc",
                    reason="glibc on Linux (malloc_trim, /proc)")
def test_freed_heap_pages_go_back_to_the_os():
    """What block by block frees between blocks leaves RSS: without the trim, glibc keeps it (measured there)."""
    import subprocess
    import sys

    found = subprocess.run([sys.executable, "-c", _FRAGMENTED_HEAP], capture_output=True, text=True, check=True)
    before, after = map(float, found.stdout.split())  # MiB resident of 200 allocated, 20 kept: freed, then trimmed
    assert before > 150 and before - after > 120, (before, after)
