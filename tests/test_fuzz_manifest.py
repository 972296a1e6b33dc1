"""Fuzzing the saved format (issue 18): random mutations of a valid manifest (types, keys, values, bytes) and of the
safetensors header, a few hundred with a fixed seed. Each either loads a model whose logits equal the original's
or fails with a one-line LmshrinkError; never another exception, a hang (per-case alarm) or a large allocation (the
cases run in a child process under an address-space cap, so asking for gigabytes fails there with MemoryError).

Run by hand for more cases: python tests/test_fuzz_manifest.py DIR SEED CASES (DIR from a saved model).
"""

from __future__ import annotations

import collections
import copy
import json
import os
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

MANIFEST_CASES = 200
HEADER_CASES = 120
SEED = 18
CASE_SECONDS = 10
MEMORY_HEADROOM = 1 << 30  # bytes of address space a case may add to the child's own (the model's tensors: ~100 kB)

SCALARS = [None, True, False, 0, 1, -1, 2, 3, 7, 2 ** 31, 2 ** 40, 2 ** 62, 10 ** 30, -2 ** 63, 0.5, 4.0, 1e308, float("nan"),
           float("inf"), "", "x", "8", "LowRankLinear", "TiedHead", "../../etc/passwd", "/dev/zero", [], {}, [1], [0, -1],
           [2 ** 40, 2], {"a": 1}, list(range(5000))]
DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "XX", 3, None]


# ----------------------------------------------------------------------------------------------- mutations


def _paths(node, prefix=()):
    """Every position inside a JSON value (dict keys and list indices), depth first."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield prefix + (key,)
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node[:50]):
            yield prefix + (index,)
            yield from _paths(value, prefix + (index,))


def _parent(root, path):
    node = root
    for step in path[:-1]:
        node = node[step]
    return node


def mutate_manifest(text: str, rng: random.Random) -> tuple[bytes, str]:
    """One random change to the manifest: a value's type or size, a key removed / renamed / added, modules swapped
    or duplicated, or the bytes themselves damaged. Returns the new bytes and what was done."""
    manifest = json.loads(text)
    kind = rng.choice(["replace", "replace", "replace", "delete", "delete", "number", "number", "add", "rename", "modules",
                       "bytes"])
    if kind == "bytes":
        data = bytearray(text.encode())
        how = rng.choice(["truncate", "flip", "insert"])
        position = rng.randrange(len(data))
        if how == "truncate":
            return bytes(data[:position]), f"truncated at {position}"
        if how == "flip":
            data[position] ^= 1 << rng.randrange(8)
            return bytes(data), f"bit flipped at {position}"
        return bytes(data[:position] + bytes([rng.randrange(256)]) + data[position:]), f"byte inserted at {position}"
    if kind == "modules":
        modules = manifest["modules"]
        names = list(modules)
        a, b = rng.sample(names, 2)
        if rng.random() < 0.5:
            modules[a], modules[b] = modules[b], modules[a]
            return json.dumps(manifest).encode(), f"modules {a} and {b} swapped"
        modules[a] = copy.deepcopy(modules[b])
        return json.dumps(manifest).encode(), f"module {a} given the spec of {b}"
    # The compression report is informational (most of the manifest's values): mutate what loading reads more often.
    paths = [p for p in _paths(manifest) if p[0] != "compression" or rng.random() < 0.1]
    if kind == "number":
        numeric = [p for p in paths if isinstance(_parent(manifest, p)[p[-1]], int) and not isinstance(_parent(manifest, p)[p[-1]], bool)]
        path = rng.choice(numeric)
        value = _parent(manifest, path)[path[-1]]
        new = rng.choice([value + 1, value - 1, value * 2, value * 1000, -value, value * 10 ** 9])
        _parent(manifest, path)[path[-1]] = new
        return json.dumps(manifest).encode(), f"{list(path)}: {value} -> {new}"
    if kind == "add":
        dicts = [()] + [p for p in paths if isinstance(_parent(manifest, p)[p[-1]], dict)]
        path = rng.choice(dicts)
        node = manifest if not path else _parent(manifest, path)[path[-1]]
        key, value = rng.choice(["extra", "layer", "config", "rank", "files", "__class__", "auto_map"]), rng.choice(SCALARS)
        node[key] = value
        return json.dumps(manifest).encode(), f"{list(path)}: added {key} = {str(value)[:40]}"
    keyed = [p for p in paths if isinstance(p[-1], str)]
    path = rng.choice(keyed if kind in ("delete", "rename") else paths)
    parent = _parent(manifest, path)
    if kind == "delete":
        del parent[path[-1]]
        return json.dumps(manifest).encode(), f"{list(path)} deleted"
    if kind == "rename":
        suffix = rng.choice(["_", "x", ".weight", ".0"])
        parent[path[-1] + suffix] = parent.pop(path[-1])
        return json.dumps(manifest).encode(), f"{list(path)} renamed with {suffix!r}"
    value = copy.deepcopy(rng.choice(SCALARS))
    parent[path[-1]] = value
    return json.dumps(manifest).encode(), f"{list(path)} = {str(value)[:40]}"


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    size = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + size]), data[8 + size:]


def mutate_header(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One random change to the safetensors header (dtype, shape, offsets, names, metadata, its length field); the
    tensor bytes stay as they were. Returns the new bytes and what was done."""
    header, body = split_safetensors(data)
    names = [n for n in header if n != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    kind = rng.choice(["dtype", "shape", "shape", "offsets", "rename", "delete", "add", "metadata", "length", "garbage"])
    if kind == "dtype":
        entry["dtype"] = rng.choice(DTYPES)
    elif kind == "shape":
        shape = entry["shape"]
        how = rng.choice(["tweak", "append", "drop", "transpose", "type"])
        if how == "tweak" and shape:
            i = rng.randrange(len(shape))
            shape[i] = rng.choice([shape[i] + 1, shape[i] - 1, 0, shape[i] * 2, 2 ** 40, -1])
        elif how == "append":
            shape.append(rng.choice([1, 2, 2 ** 31]))
        elif how == "drop" and shape:
            shape.pop()
        elif how == "transpose":
            shape.reverse()
        else:
            entry["shape"] = rng.choice(SCALARS)
    elif kind == "offsets":
        offsets = entry["data_offsets"]
        i = rng.randrange(2)
        offsets[i] = rng.choice([offsets[i] + 4, offsets[i] - 4, 0, len(body) + 4, 2 ** 62, -1])
    elif kind == "rename":
        header[name + rng.choice(["_", ".x", "s"])] = header.pop(name)
    elif kind == "delete":
        del header[name]
    elif kind == "add":
        header[rng.choice(["extra", "lm_head.weight", name + ".copy"])] = copy.deepcopy(header[rng.choice(names)])
    elif kind == "metadata":
        header["__metadata__"] = rng.choice([{"format": "pt"}, {"x": "y"}, {"format": 3}, [], None, "pt"])
    text = json.dumps(header).encode()
    if kind == "garbage":
        text = text[:rng.randrange(len(text))]
    length = len(text) + (rng.choice([-9, -1, 1, 8, 2 ** 40]) if kind == "length" else 0)
    return struct.pack("<Q", max(length, 0)) + text + body, f"{kind} of {name}: {str(header.get(name, header.get('__metadata__')))[:80]}"


# ----------------------------------------------------------------------------------------------- the child process


class CaseTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise CaseTimeout()


def _address_space() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize")


def run_cases(pristine: Path, seed: int, manifest_cases: int, header_cases: int, scratch: Path) -> list[dict]:
    """Load every mutated directory under an alarm; the caller has capped this process's address space."""
    import torch

    import lmshrink
    from lmshrink.errors import LmshrinkError

    torch.manual_seed(0)
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = lmshrink.load(pristine).logits(ids)
    manifest_text = (pristine / "lmshrink.json").read_text()
    weights_path = next(pristine.glob("model-*-of-*.safetensors")).name  # the one shard of a small model
    weights = (pristine / weights_path).read_bytes()
    results = []
    signal.signal(signal.SIGALRM, _alarm)
    for index in range(manifest_cases + header_cases):
        rng = random.Random(seed * 1_000_003 + index)
        folder = scratch / f"case{index}"
        shutil.copytree(pristine, folder)
        if index < manifest_cases:
            what = "manifest"
            data, change = mutate_manifest(manifest_text, rng)
            (folder / "lmshrink.json").write_bytes(data)
            verify = True
        else:
            what = "header"
            data, change = mutate_header(weights, rng)
            (folder / weights_path).write_bytes(data)
            verify = False  # the digest would refuse any changed byte: test the structural checks themselves
        start = time.perf_counter()
        outcome, detail = None, ""
        signal.alarm(CASE_SECONDS)
        try:
            loaded = lmshrink.load(folder, verify=verify)
            with torch.no_grad():
                got = loaded.logits(ids)
            outcome = "equal" if got.shape == expected.shape and torch.equal(got, expected) else "different"
        except CaseTimeout:
            outcome = "timeout"
        except LmshrinkError as error:
            outcome = "one-line error" if "\n" not in str(error) and str(error) else "multi-line error"
            detail = str(error)[:300]
        except BaseException as error:  # noqa: BLE001 - any other exception is exactly what this test looks for
            outcome, detail = f"unexpected {type(error).__name__}", str(error)[:300]
        finally:
            signal.alarm(0)
        results.append({"case": index, "what": what, "change": change, "outcome": outcome, "detail": detail,
                        "seconds": round(time.perf_counter() - start, 3)})
        shutil.rmtree(folder, ignore_errors=True)
    return results


def child_main(argv: list[str]) -> None:
    pristine, seed, manifest_cases, header_cases, scratch = Path(argv[0]), int(argv[1]), int(argv[2]), int(argv[3]), Path(argv[4])
    import torch

    import lmshrink

    torch.set_num_threads(1)
    lmshrink.load(pristine)  # warm every import before measuring the address space
    limit = _address_space() + MEMORY_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:  # the cap works: two gigabytes more cannot be had
        torch.empty(MEMORY_HEADROOM // 2, dtype=torch.float32)
        capped = False
    except (RuntimeError, MemoryError):
        capped = True
    results = run_cases(pristine, seed, manifest_cases, header_cases, scratch)
    print(json.dumps({"limit": limit, "capped": capped, "results": results}))


# ----------------------------------------------------------------------------------------------- the test


def test_fuzzed_manifests_and_headers_load_equal_or_fail_in_one_line(tmp_path):
    import torch

    import lmshrink
    from tests.conftest import tiny_gpt2

    # Tied GPT-2 with every linear and the embedding low-rank: LowRankLinear, LowRankEmbedding and a TiedHead.
    loaded = tiny_gpt2(tie=True)
    lmshrink.compress(loaded, lmshrink.Plan(ratio=0.5, targets=("linears", "embedding")), progress=False)
    pristine = lmshrink.save(loaded, tmp_path / "pristine")
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(lmshrink.load(pristine).logits(ids), loaded.logits(ids))
    scratch = tmp_path / "cases"
    scratch.mkdir()
    start = time.perf_counter()
    child = subprocess.run([sys.executable, __file__, str(pristine), str(SEED), str(MANIFEST_CASES), str(HEADER_CASES), str(scratch)],
                           capture_output=True, text=True, timeout=600, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert child.returncode == 0, child.stderr[-3000:]
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert report["capped"]
    results = report["results"]
    counts = collections.Counter((r["what"], r["outcome"]) for r in results)
    print(f"fuzz: {len(results)} cases in {time.perf_counter() - start:.1f} s under a {report['limit'] / 2 ** 30:.1f} GiB "
          f"address-space cap: {dict(counts)}")
    bad = [r for r in results if r["outcome"] not in ("equal", "one-line error")]
    assert not bad, bad[:10]
    assert len(results) == MANIFEST_CASES + HEADER_CASES
    assert max(r["seconds"] for r in results) < CASE_SECONDS
    # The mutations reach both outcomes: harmless changes (extra keys, report fields) load, the rest are refused.
    assert counts[("manifest", "equal")] >= 10 and counts[("manifest", "one-line error")] >= 100
    assert counts[("header", "one-line error")] >= 80


if __name__ == "__main__":
    child_main(sys.argv[1:])
