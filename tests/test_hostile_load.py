"""Hostile and broken model directories (issues 18 and 20, loading side): no code from the model runs, no file outside
the directory is read, nothing is allocated beyond the stored tensors, every parameter comes from the files, corrupted
or non-finite weights are refused, and every failure is one line (LmshrinkError in Python; `error: ...`, exit 2, no
traceback and nothing written from the command line). Every case builds its damaged directory itself on tiny models.
"""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import struct
import subprocess
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import lmshrink
from lmshrink.errors import CorruptFile, LmshrinkError, NotAModel
from lmshrink.models import FAMILIES, LoadedModel
from lmshrink.models.lstm import RNNModel, Vocabulary
from lmshrink.safefiles import file_digest
from tests.conftest import saved_weights, tiny_gpt2, tiny_llama

ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
SHARD, INDEX = "model-00001-of-00001.safetensors", "model.safetensors.index.json"  # a small model's saved weights
TEXT = "the quick brown fox jumps over the lazy dog.\n" * 40


# ----------------------------------------------------------------------------------------------- building blocks


def logits(loaded, seed=0):
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return loaded.logits(ids)


def copy_dir(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, symlinks=True)
    return target


def manifest(folder: Path) -> dict:
    return json.loads((folder / "lmshrink.json").read_text())


def write_manifest(folder: Path, content) -> None:
    (folder / "lmshrink.json").write_text(json.dumps(content))


def rewrite_weights(folder: Path, tensors: dict, record_digest: bool = True) -> None:
    """Replace the weights (the one shard and its index) and record their digests, as a consistent but wrong save
    would: what the load's own checks (not the digest) must catch."""
    shard = saved_weights(folder)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": dict.fromkeys(tensors, shard.name)}))
    if record_digest:
        content = manifest(folder)
        content["files"] = {shard.name: file_digest(shard), index.name: file_digest(index)}
        write_manifest(folder, content)


def run_cli(*args, cwd: Path, stdin: str | None = None):
    """`python -m lmshrink ARGS` in its own process (slow: a few seconds of imports each)."""
    return subprocess.run([sys.executable, "-m", "lmshrink", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=ENV, input=stdin, timeout=300)


def run_cli_here(*args, cwd: Path):
    """The same command line run in this process (click's runner): exit status and streams as a user sees them; an
    exception the CLI does not turn into a one-line error shows up as a traceback in stderr."""
    from click.testing import CliRunner

    from lmshrink.cli import main

    previous = os.getcwd()
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)
    finally:
        os.chdir(previous)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "Traceback: " + "".join(traceback.format_exception(result.exception))
    return SimpleNamespace(returncode=result.exit_code, stdout=result.stdout, stderr=stderr)


def assert_one_line_error(result, *needles: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def tree(folder: Path) -> dict:
    """Every entry under a folder with its size and mtime (links not followed): to prove nothing was written."""
    return {str(p.relative_to(folder)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """Saved directories of each kind, never modified (tests copy them)."""
    root = tmp_path_factory.mktemp("pristine")
    llama = tiny_llama(tie=False)
    lmshrink.compress(llama, lmshrink.Plan(ratio=0.5, targets=("linears", "lm_head")), progress=False)
    lmshrink.save(llama, root / "llama")
    gpt2 = tiny_gpt2(tie=True)  # tied embedding -> TiedHead over a factorized embedding; no tokenizer
    lmshrink.compress(gpt2, lmshrink.Plan(ratio=0.5, targets=("linears", "embedding")), progress=False)
    lmshrink.save(gpt2, root / "gpt2")
    dense = tiny_llama(tie=True)
    dense.model.save_pretrained(root / "hf")
    dense.tokenizer.save_pretrained(root / "hf")
    words = Vocabulary(["<eos>", "<unk>", "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog."])
    torch.manual_seed(0)
    lstm = LoadedModel(RNNModel(len(words), 8, 8, 1, dropout=0.0).eval(), FAMILIES["word-lstm"], words, "tiny-lstm")
    lmshrink.save(lstm, root / "lstm")
    (root / "text.txt").write_text(TEXT)
    return {"llama": (root / "llama", logits(llama)), "gpt2": (root / "gpt2", logits(gpt2)),
            "hf": (root / "hf", logits(dense)), "lstm": (root / "lstm", None), "text": root / "text.txt"}


@pytest.fixture
def work(tmp_path):
    """An empty current directory for CLI runs (it must stay empty: nothing written)."""
    folder = tmp_path / "cwd"
    folder.mkdir()
    return folder


def refused_everywhere(folder: Path, work: Path, text: Path, *needles: str, error=LmshrinkError) -> None:
    """The same refusal through lmshrink.load_model, and `lmshrink eval` / `inspect`: one line, exit 2, nothing written."""
    before = tree(folder.parent)
    with pytest.raises(error) as raised:
        lmshrink.load_model(folder)
    message = str(raised.value)
    assert "\n" not in message and all(n in message for n in needles), message
    for command in (["eval", folder, "--data", text, "--tokens", "64", "--window", "32"], ["inspect", folder]):
        assert_one_line_error(run_cli_here(*command, cwd=work), *needles)
    assert tree(folder.parent) == before and not any(work.iterdir())


# ----------------------------------------------------------------------------------------------- 18.1 code execution

CANARY_CODE = """import pathlib
pathlib.Path({canary!r}).write_text("code from the model directory ran")
from transformers import PretrainedConfig, PreTrainedTokenizerFast
class CanaryConfig(PretrainedConfig):
    model_type = "canary"
class CanaryTokenizer(PreTrainedTokenizerFast):
    pass
"""


def edit_base_config(folder: Path, edit) -> None:
    """Apply ``edit`` to the base model's config: config.json itself, or the base config inside lmshrink's wrapper."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config["lmshrink"]["base_config"] if config.get("model_type") == "lmshrink" else config)
    path.write_text(json.dumps(config))


def plant_canary(folder: Path, where: str) -> Path:
    canary = folder.parent / f"{folder.name}-canary"
    (folder / "canary_code.py").write_text(CANARY_CODE.format(canary=str(canary)))
    path = folder / where
    content = json.loads(path.read_text())
    if where == "config.json":
        content["auto_map"] = {"AutoConfig": "canary_code.CanaryConfig", "AutoModelForCausalLM": "canary_code.CanaryConfig"}
    else:
        content["auto_map"] = {"AutoTokenizer": ["canary_code.CanaryTokenizer", "canary_code.CanaryTokenizer"]}
        content["tokenizer_class"] = "CanaryTokenizer"
    path.write_text(json.dumps(content))
    return canary


def run_in_pty(args, cwd: Path, answer: bytes = b"y\n", limit: float = 240.0) -> tuple[int, str]:
    """Run the CLI on a pseudo-terminal (stdin, stdout and stderr all a TTY), answering every prompt with ``answer``."""
    master, slave = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "lmshrink", *map(str, args)], stdin=slave, stdout=slave, stderr=slave,
                               cwd=cwd, env=ENV, close_fds=True)
    os.close(slave)
    os.write(master, answer)  # typed ahead, as an impatient user would
    output, deadline = b"", time.monotonic() + limit
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
            if b"[y/N]" in chunk or b"trust_remote_code" in chunk:
                os.write(master, answer)
        elif process.poll() is not None:
            break
    code = process.wait(timeout=30)
    os.close(master)
    return code, output.decode("utf-8", "replace")


@pytest.mark.parametrize("kind,where", [("hf", "config.json"), ("hf", "tokenizer_config.json"),
                                        ("llama", "config.json"), ("llama", "tokenizer_config.json")])
def test_auto_map_is_refused_and_its_code_never_runs(pristine, tmp_path, work, kind, where):
    folder = copy_dir(pristine[kind][0], tmp_path / "model")
    canary = plant_canary(folder, where)
    with pytest.raises(NotAModel, match="auto_map.*never runs code"):
        lmshrink.load_model(folder)
    args = ["eval", folder, "--data", pristine["text"], "--tokens", "64", "--window", "32"]
    assert_one_line_error(run_cli(*args, cwd=work, stdin="y\n"), where, "auto_map")
    code, output = run_in_pty(args, work)
    lines = [line for line in output.splitlines() if line.strip() and line.strip() != "y"]  # the terminal echoes the typed answer
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "auto_map" in lines[0], output
    assert "[y/N]" not in output and "Traceback" not in output
    assert not canary.exists() and not any(work.iterdir())


def test_every_transformers_call_passes_trust_remote_code_false(pristine, monkeypatch):
    import transformers

    calls = []

    def spy(cls, method):
        original = getattr(cls, method)

        def recorded(*args, **kwargs):
            if sys._getframe(1).f_globals.get("__name__", "").startswith("lmshrink"):
                calls.append((cls.__name__, method, kwargs.get("trust_remote_code", "absent")))
            return original(*args, **kwargs)

        monkeypatch.setattr(cls, method, recorded)

    for cls in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModel, transformers.AutoModelForCausalLM):
        spy(cls, "from_pretrained")
    for cls in (transformers.AutoModel, transformers.AutoModelForCausalLM):
        spy(cls, "from_config")
    lmshrink.load_model(pristine["hf"][0])
    lmshrink.load_model(pristine["llama"][0])
    kinds = {(name, method) for name, method, _ in calls}
    assert {("AutoConfig", "from_pretrained"), ("AutoTokenizer", "from_pretrained"),
            ("AutoModelForCausalLM", "from_pretrained"), ("AutoModelForCausalLM", "from_config")} <= kinds
    assert all(flag is False for _, _, flag in calls), calls


@pytest.mark.parametrize("change,needle", [
    ({"model_type": "no-such-architecture"}, "no-such-architecture"),
    ({"model_type": None}, "lacks a 'model_type'"),
])
def test_unknown_or_missing_model_type(pristine, tmp_path, work, change, needle):
    folder = copy_dir(pristine["hf"][0], tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    config.update(change)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    refused_everywhere(folder, work, pristine["text"], "config.json", needle)


# ----------------------------------------------------------------------------------------------- 18.2 files outside


def outside_vocabulary(tmp_path: Path) -> Path:
    # A valid vocabulary of the right size: if it were read, the load would succeed.
    path = tmp_path / "secret.json"
    path.write_text(json.dumps(["<eos>", "<unk>", "s1", "s2", "s3", "s4", "s5", "s6", "s7", "s8"]))
    return path


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink-out", "fifo", "dev-zero", "directory", "missing", "not-a-string"])
def test_manifest_named_file_must_be_a_regular_file_inside(pristine, tmp_path, work, how):
    folder = copy_dir(pristine["lstm"][0], tmp_path / "model")
    secret = outside_vocabulary(tmp_path)
    content = manifest(folder)
    vocab = folder / "vocab.json"
    if how == "absolute":
        content["base"]["vocab"] = str(secret)
    elif how == "dotdot":
        content["base"]["vocab"] = "../secret.json"
    elif how == "symlink-out":
        vocab.unlink()
        vocab.symlink_to(secret)
    elif how == "fifo":
        vocab.unlink()
        os.mkfifo(vocab)
    elif how == "dev-zero":
        vocab.unlink()
        vocab.symlink_to("/dev/zero")
    elif how == "directory":
        content["base"]["vocab"] = "sub"
        (folder / "sub").mkdir()
    elif how == "missing":
        vocab.unlink()
    else:
        content["base"]["vocab"] = 7
    write_manifest(folder, content)
    start = time.monotonic()
    refused_everywhere(folder, work, pristine["text"], "MODEL")
    assert time.monotonic() - start < 120  # a FIFO never hangs the loader


@pytest.mark.parametrize("name,how", [("config.json", "fifo"), ("tokenizer.json", "dev-zero"), ("model.safetensors", "dev-zero"),
                                      ("model.safetensors", "fifo")])
def test_hugging_face_directory_files_must_be_regular(pristine, tmp_path, work, name, how):
    folder = copy_dir(pristine["hf"][0], tmp_path / "model")
    path = folder / name
    outside = tmp_path / f"outside-{name}"
    shutil.copy(path, outside)
    path.unlink()
    if how == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    refused_everywhere(folder, work, pristine["text"], name)


def test_hugging_face_cache_snapshot_links_load(pristine, tmp_path):
    """A Hugging Face cache snapshot links every file into ../../blobs: links out of a plain Hugging Face directory
    that end at regular files load (an lmshrink directory stays strict: everything it names lies inside)."""
    source = pristine["hf"][0]
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for file in sorted(source.iterdir()):
        shutil.copy(file, blobs / file.name)
        (snapshot / file.name).symlink_to(os.path.relpath(blobs / file.name, snapshot))
    ids = torch.arange(1, 17)[None]
    with torch.no_grad():
        assert torch.equal(lmshrink.load_model(snapshot).logits(ids), lmshrink.load_model(source).logits(ids))


def test_recorded_digest_naming_a_file_outside_is_refused(pristine, tmp_path):
    folder = copy_dir(pristine["llama"][0], tmp_path / "model")
    content = manifest(folder)
    content["files"]["../../etc/passwd"] = {"sha256": "0" * 64, "size": 1}
    write_manifest(folder, content)
    with pytest.raises(CorruptFile, match="outside the directory"):
        lmshrink.load(folder)


# ----------------------------------------------------------------------------------------------- 18.3 memory


@pytest.mark.parametrize("module,key,value", [
    ("model.layers.0.self_attn.q_proj", "rank", 10 ** 9),
    ("model.layers.0.self_attn.q_proj", "in_features", 2 ** 38),
    ("lm_head", "out_features", 10 ** 10),
])
def test_manifest_shapes_are_checked_against_the_header_before_allocating(pristine, tmp_path, work, module, key, value):
    folder = copy_dir(pristine["llama"][0], tmp_path / "model")
    content = manifest(folder)
    content["modules"][module]["config"][key] = value
    write_manifest(folder, content)
    start = time.monotonic()
    refused_everywhere(folder, work, pristine["text"], module, "model.safetensors")
    assert time.monotonic() - start < 120


@pytest.mark.parametrize("key,value,needle", [
    ("vocab_size", 10 ** 12, "the file holds"),
    ("num_hidden_layers", 10 ** 6, "num_hidden_layers"),
    ("hidden_size", 2 ** 20, "model.safetensors"),
    ("intermediate_size", 10 ** 9, "parameters but the weights hold"),
])
def test_config_sizes_are_bounded_by_the_stored_tensors(pristine, tmp_path, key, value, needle):
    kinds = ("llama", "hf") if key != "intermediate_size" else ("hf",)
    for kind in kinds:
        folder = copy_dir(pristine[kind][0], tmp_path / kind)
        edit_base_config(folder, lambda config: config.update({key: value}))
        start = time.monotonic()
        with pytest.raises(CorruptFile) as raised:
            lmshrink.load_model(folder)
        assert time.monotonic() - start < 60 and "\n" not in str(raised.value)
        assert needle in str(raised.value) or kind == "hf" and "config.json" in str(raised.value), str(raised.value)


def test_dense_modules_replaced_by_the_manifest_are_never_allocated(pristine, tmp_path):
    # Every MLP matrix of this model is low-rank: config.json's intermediate_size sizes only the dense modules the
    # manifest replaces, which exist on the meta device alone, so 10^9 x 64 floats are never asked for.
    folder = copy_dir(pristine["llama"][0], tmp_path / "model")
    edit_base_config(folder, lambda config: config.update(intermediate_size=10 ** 9))
    assert torch.allclose(logits(lmshrink.load(folder)), pristine["llama"][1], atol=1e-5)


def test_word_lstm_sizes_are_bounded(pristine, tmp_path):
    for change, needle in (({"nlayers": 10 ** 7}, "nlayers"), ({"ninp": 10 ** 9}, "does not match"),
                           ({"ntoken": 10 ** 9}, "distinct words"), ({"dropout": "high"}, "dropout"), ({"nhid": 0}, "nhid")):
        folder = copy_dir(pristine["lstm"][0], tmp_path / f"model-{len(os.listdir(tmp_path))}")
        content = manifest(folder)
        content["base"]["lstm"].update(change)
        write_manifest(folder, content)
        with pytest.raises(CorruptFile, match=needle):
            lmshrink.load(folder)


@pytest.mark.parametrize("value,needle", [
    ("8", "'rank' is '8'; allowed: an integer >= 1"), (-3, "'rank' is -3"), (True, "'rank' is True"), (4.0, "'rank' is 4.0"),
    (None, "'rank' is None"), ("missing", "lacks 'rank'"),
])
def test_layer_config_values_are_validated(pristine, tmp_path, work, value, needle):
    folder = copy_dir(pristine["llama"][0], tmp_path / "model")
    content = manifest(folder)
    config = content["modules"]["model.layers.1.mlp.up_proj"]["config"]
    if value == "missing":
        del config["rank"]
    else:
        config["rank"] = value
    write_manifest(folder, content)
    refused_everywhere(folder, work, pristine["text"], "model.layers.1.mlp.up_proj", "LowRankLinear", needle)


def test_tied_head_config_is_validated(pristine, tmp_path):
    for change, needle in (({"embedding": "transformer.h.0"}, "factorized embedding"), ({"embedding": "no.such"}, "factorized embedding"),
                           ({"bias": "yes"}, "'bias' is 'yes'"), ({"embedding": 5}, "factorized embedding")):
        folder = copy_dir(pristine["gpt2"][0], tmp_path / f"model-{len(os.listdir(tmp_path))}")
        content = manifest(folder)
        content["modules"]["lm_head"]["config"].update(change)
        write_manifest(folder, content)
        with pytest.raises(CorruptFile, match=needle) as raised:
            lmshrink.load(folder)
        assert "'lm_head' (TiedHead)" in str(raised.value)


# ----------------------------------------------------------------------------------------------- 18.4 one line, no traceback


def _manifest_edit(edit):
    def apply(folder: Path):
        content = manifest(folder)
        edit(content)
        write_manifest(folder, content)
    return apply


def _write(name: str, data: bytes):
    return lambda folder: (folder / name).write_bytes(data)


MANIFEST_CASES = {
    "not-utf8": (_write("lmshrink.json", b'{"format": "lmshrink\xff\xfe"}'), "not UTF-8"),
    "not-json": (_write("lmshrink.json", b"{format: lmshrink"), "not valid JSON"),
    "json-list": (_write("lmshrink.json", b"[1, 2, 3]"), "holds a JSON list"),
    "empty": (_write("lmshrink.json", b""), "not valid JSON"),
    "deep-nesting": (_write("lmshrink.json", b"[" * 100000 + b"]" * 100000), "lmshrink.json"),
    "huge-integer": (_write("lmshrink.json", b'{"format": "lmshrink", "format_version": ' + b"9" * 5000 + b"}"), "lmshrink.json"),
    "lacks-base": (_manifest_edit(lambda m: m.pop("base")), "lacks 'base'"),
    "lacks-modules": (_manifest_edit(lambda m: m.pop("modules")), "lacks 'modules'"),
    "lacks-family": (_manifest_edit(lambda m: m.pop("family")), "lacks 'family'"),
    "modules-list": (_manifest_edit(lambda m: m.update(modules=[])), "'modules' of type list"),
    "lacks-layer": (_manifest_edit(lambda m: m["modules"]["lm_head"].pop("layer")), "describes module 'lm_head'"),
    "lacks-config": (_manifest_edit(lambda m: m["modules"]["lm_head"].pop("config")), "describes module 'lm_head'"),
    "unknown-layer": (_manifest_edit(lambda m: m["modules"]["lm_head"].update(layer="Evil")), "layer type 'Evil'"),
    "unknown-module": (_manifest_edit(lambda m: m["modules"].update({"model.nope": m["modules"]["lm_head"]})), "'model.nope'"),
    "parameter-as-module": (_manifest_edit(lambda m: m["modules"].update({"lm_head.weight": m["modules"]["lm_head"]})), "'lm_head.weight'"),
    "root-module": (_manifest_edit(lambda m: m["modules"].update({"": m["modules"]["lm_head"]})), "non-empty module name"),
    "unknown-family": (_manifest_edit(lambda m: m.update(family="evil")), "family 'evil'"),
    "base-garbage": (_manifest_edit(lambda m: m.update(base={"causal": "yes"})), "base"),
    "newer-format": (_manifest_edit(lambda m: m.update(format_version=99)), "upgrade lmshrink"),
    "format-version-zero": (_manifest_edit(lambda m: m.update(format_version=0)), "format 0"),
    "compression-garbage": (_manifest_edit(lambda m: m.update(compression="x")), "'compression'"),
    "files-garbage": (_manifest_edit(lambda m: m.update(files={"model.safetensors": "abc"})), "'files'"),
    "config-garbage": (_write("config.json", b"\x00\x01garbage"), "config.json"),
    "config-list": (_write("config.json", b"[]"), "config.json"),
    "config-lacks-type": (lambda f: (f / "config.json").write_text(json.dumps({"hidden_size": 64})), "model_type"),
    "config-unknown-type": (lambda f: (f / "config.json").write_text(json.dumps({"model_type": "evil"})), "'evil'"),
    "config-inconsistent": (lambda f: edit_base_config(f, lambda config: config.update(num_attention_heads=7)), "config.json"),
    "config-wrapper-without-base": (lambda f: (f / "config.json").write_text(json.dumps({"model_type": "lmshrink"})), "no base model config"),
    "tokenizer-garbage": (_write("tokenizer.json", b"{garbage"), "tokenizer"),
    "tokenizer-missing": (lambda f: [(f / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")], "tokenizer"),
    "weights-truncated": (lambda f: (f / SHARD).write_bytes((f / SHARD).read_bytes()[:5000]), "truncated or corrupted"),
    "weights-empty": (_write(SHARD, b""), "truncated or corrupted"),
    "weights-missing": (lambda f: (f / SHARD).unlink(), SHARD),
    "weights-header-garbage": (lambda f: (f / SHARD).write_bytes(struct.pack("<Q", 12) + b"{not json!!}"), "truncated or corrupted"),
    "weights-header-huge": (lambda f: (f / SHARD).write_bytes(struct.pack("<Q", 2 ** 60) + b"{}"), "truncated or corrupted"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_CASES))
def test_damaged_lmshrink_directory_is_one_line(pristine, tmp_path, work, case):
    folder = copy_dir(pristine["llama"][0], tmp_path / "model")
    damage, needle = MANIFEST_CASES[case]
    damage(folder)
    refused_everywhere(folder, work, pristine["text"], needle)


HF_CASES = {
    "config-garbage": (_write("config.json", b"garbage"), "config.json"),
    "config-lacks-type": (lambda f: (f / "config.json").write_text(json.dumps({"hidden_size": 64})), "model_type"),
    "config-unknown-type": (lambda f: (f / "config.json").write_text(json.dumps({"model_type": "evil"})), "'evil'"),
    "tokenizer-garbage": (_write("tokenizer.json", b"\x89PNG garbage"), "tokenizer"),
    "tokenizer-missing": (lambda f: [(f / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")], "tokenizer"),
    "weights-truncated": (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:-100]), "truncated or corrupted"),
    "weights-missing": (lambda f: (f / "model.safetensors").unlink(), "no model.safetensors"),
    "pickle-only": (lambda f: ((f / "model.safetensors").unlink(), (f / "pytorch_model.bin").write_bytes(b"pickle")), "safetensors weights only"),
    "index-outside": (lambda f: ((f / "model.safetensors").unlink(), (f / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": "/etc/passwd"}}))), "outside the directory"),
}


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_damaged_hugging_face_directory_is_one_line(pristine, tmp_path, work, case):
    folder = copy_dir(pristine["hf"][0], tmp_path / "model")
    damage, needle = HF_CASES[case]
    damage(folder)
    refused_everywhere(folder, work, pristine["text"], needle)


@pytest.mark.parametrize("cut", [0, 7, 100, 4096])
def test_truncated_gguf_is_one_line(tmp_path, work, pristine, cut):
    from lmshrink.models.builtin import BUILTINS, cache_dir

    source = cache_dir() / "models" / "smollm2-135m" / BUILTINS["smollm2-135m"].local_name
    path = tmp_path / "model.gguf"
    if source.is_file():
        with open(source, "rb") as handle:
            path.write_bytes(handle.read(cut))
    else:  # a GGUF header (magic, version, counts) cut short
        path.write_bytes((b"GGUF" + struct.pack("<IQQ", 3, 10, 10) + b"\x05" * 4096)[:cut])
    refused_everywhere(path, work, pristine["text"], "model.gguf")


@pytest.mark.parametrize("key,value,needle", [("llama.block_count", 100_000, "block_count = 100,000"),
                                             ("llama.feed_forward_length", 4_000_000, "feed-forward width 4,000,000")])
def test_gguf_metadata_asking_for_more_than_it_stores_is_refused_before_building(tmp_path, key, value, needle):
    """GGUF metadata sizes the model transformers builds: a crafted count must not cost memory or minutes."""
    import gguf

    from lmshrink.models.builtin import fetch_builtin

    path = tmp_path / "model.gguf"
    shutil.copy(fetch_builtin("smollm2-135m"), path)
    reader = gguf.GGUFReader(str(path), "r+")
    reader.fields[key].parts[-1][0] = value  # the value's bytes in the memory-mapped file
    del reader
    start = time.monotonic()
    with pytest.raises(CorruptFile, match=needle) as error:
        lmshrink.load_model(path)
    assert "\n" not in str(error.value) and time.monotonic() - start < 60


@pytest.mark.parametrize("content", ["empty-dict", "empty-tensors", "wrong-dims", "not-a-checkpoint", "huge-layer-index"])
def test_import_lm_bad_checkpoints_are_one_line(tmp_path, work, content):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for split in ("train", "valid", "test"):
        (corpus / f"{split}.txt").write_text("a b c\nd e\n")
    checkpoint = tmp_path / "model.pt"
    if content == "empty-dict":
        torch.save({}, checkpoint)
    elif content == "empty-tensors":
        torch.save({"encoder.weight": torch.zeros(6, 0), "decoder.bias": torch.zeros(6)}, checkpoint)
    elif content == "wrong-dims":
        torch.save({"encoder.weight": torch.zeros(6), "decoder.bias": torch.zeros(6)}, checkpoint)
    elif content == "huge-layer-index":
        state = RNNModel(6, 4, 4, 1).state_dict()
        state["rnn.weight_hh_l99999999"] = torch.zeros(16, 4)
        torch.save(state, checkpoint)
    else:
        checkpoint.write_bytes(b"")
    out = tmp_path / "out"
    assert_one_line_error(run_cli_here("import-lm", checkpoint, "--corpus", corpus, "--out", out, cwd=work), "CHECKPOINT")
    assert not out.exists() and not any(work.iterdir())


# ----------------------------------------------------------------------------------------------- 20.1 strict loading


@pytest.mark.parametrize("how", ["deleted", "fifo", "dev-zero", "dangling-link"])
def test_missing_or_unreadable_manifest_is_a_damaged_lmshrink_directory(pristine, tmp_path, work, how):
    folder = copy_dir(pristine["llama"][0], tmp_path / "model")
    path = folder / "lmshrink.json"
    path.unlink()
    if how == "fifo":
        os.mkfifo(path)
    elif how == "dev-zero":
        path.symlink_to("/dev/zero")
    elif how == "dangling-link":
        path.symlink_to(tmp_path / "nowhere.json")
    refused_everywhere(folder, work, pristine["text"], "lmshrink.json", error=CorruptFile)


def test_hugging_face_directory_missing_a_tensor_is_refused(pristine, tmp_path, work):
    folder = copy_dir(pristine["hf"][0], tmp_path / "model")
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    refused_everywhere(folder, work, pristine["text"], "model.layers.1.mlp.down_proj.weight", error=CorruptFile)


def test_plain_hugging_face_directory_loads_with_tied_head_and_computed_buffers(pristine):
    folder, expected = pristine["hf"]
    loaded = lmshrink.load_model(folder)
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight  # tied: stored once, not "missing"
    assert torch.allclose(logits(loaded), expected, atol=1e-5)  # rotary inv_freq (not stored) computed as before


@pytest.mark.parametrize("case", ["missing", "extra", "renamed", "shape", "int32", "stored-twice"])
def test_weights_not_matching_the_manifest_are_refused_naming_the_module(pristine, tmp_path, work, case):
    folder = copy_dir(pristine["llama"][0], tmp_path / "model")
    tensors = load_file(str(saved_weights(folder)))
    name = "model.layers.0.self_attn.v_proj.left"
    if case == "missing":
        del tensors[name]
    elif case == "extra":
        tensors["model.layers.0.self_attn.v_proj.extra"] = torch.zeros(3)
    elif case == "renamed":
        tensors["model.layers.0.self_attn.v_proj.lefty"] = tensors.pop(name)
    elif case == "shape":
        tensors[name] = torch.zeros(tensors[name].shape[0], tensors[name].shape[1] + 1)
    elif case == "int32":
        tensors[name] = tensors[name].to(torch.int32)
    else:
        tensors["model.embed_tokens.weight.copy"] = tensors["model.embed_tokens.weight"].clone()
    rewrite_weights(folder, tensors)
    needle = "model.layers.0.self_attn.v_proj" if case != "stored-twice" else "model.embed_tokens.weight.copy"
    message = str(pytest.raises(CorruptFile, lmshrink.load, folder).value)
    assert needle in message and "\n" not in message
    if case == "int32":
        assert "int32" in message and "float32" in message
    if case not in ("extra", "stored-twice"):
        assert "LowRankLinear" in message
    assert_one_line_error(run_cli_here("inspect", folder, cwd=work), needle)


def test_float64_weights_are_cast_not_refused(pristine, tmp_path):
    folder = copy_dir(pristine["llama"][0], tmp_path / "model")
    rewrite_weights(folder, {k: v.double() if v.is_floating_point() else v for k, v in load_file(str(saved_weights(folder))).items()})
    assert torch.allclose(logits(lmshrink.load(folder)), pristine["llama"][1], atol=1e-5)


# ----------------------------------------------------------------------------------------------- 20.2 integrity


def test_flipped_exponent_bits_are_caught_by_the_digest(pristine, tmp_path, work):
    folder = copy_dir(pristine["llama"][0], tmp_path / "model")
    weights = folder / SHARD
    data = bytearray(weights.read_bytes())
    start = 8 + struct.unpack("<Q", data[:8])[0]
    for k in range(64):  # the high byte of 64 float32 values: exponent bits, size unchanged
        data[start + 4 * (97 * k % ((len(data) - start) // 4)) + 3] ^= 0x20
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptFile, match="truncated or corrupted: its sha256"):
        lmshrink.load(folder)
    assert_one_line_error(run_cli_here("eval", folder, "--data", pristine["text"], "--tokens", "64", "--window", "32", cwd=work), "sha256")
    again = lmshrink.load(folder, verify=False)  # the digest check is what caught it: the values are finite
    assert not torch.allclose(logits(again), pristine["llama"][1])


def test_manifest_without_digests_still_loads(pristine, tmp_path):
    folder = copy_dir(pristine["llama"][0], tmp_path / "model")
    content = manifest(folder)
    assert set(content["files"]) == {SHARD, INDEX} and len(content["files"][SHARD]["sha256"]) == 64
    del content["files"]  # as lmshrink wrote it before digests
    write_manifest(folder, content)
    assert torch.allclose(logits(lmshrink.load(folder)), pristine["llama"][1], atol=1e-6)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "lstm"])
def test_saved_directories_round_trip(pristine, kind):
    folder, expected = pristine[kind]
    loaded = lmshrink.load_model(folder)
    if expected is not None:
        assert torch.allclose(logits(loaded), expected, atol=1e-5)
    else:
        assert loaded.tokenizer.idx2word[:3] == ["<eos>", "<unk>", "the"]


# ----------------------------------------------------------------------------------------------- 20.3 non-finite weights


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(pristine, tmp_path, work, value):
    folder = copy_dir(pristine["llama"][0], tmp_path / "model")
    tensors = load_file(str(saved_weights(folder)))
    tensors["model.layers.1.self_attn.o_proj.right"][0, 3] = value
    rewrite_weights(folder, tensors)
    refused_everywhere(folder, work, pristine["text"], "model.layers.1.self_attn.o_proj.right", "non-finite", error=CorruptFile)


def test_non_finite_weights_in_a_hugging_face_directory_are_refused(pristine, tmp_path, work):
    folder = copy_dir(pristine["hf"][0], tmp_path / "model")
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.norm.weight"][5] = float("inf")
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    refused_everywhere(folder, work, pristine["text"], "model.norm.weight", "non-finite", error=CorruptFile)


def test_hugging_face_int_tensor_into_float_parameter_is_refused(pristine, tmp_path):
    folder = copy_dir(pristine["hf"][0], tmp_path / "model")
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.norm.weight"] = torch.ones(64, dtype=torch.int32)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CorruptFile, match="model.norm.weight.*int32"):
        lmshrink.load_model(folder)


def test_real_command_line_process_on_hostile_directories(pristine, tmp_path, work):
    """A few of the cases above through `python -m lmshrink` in its own process: a FIFO manifest and a /dev/zero
    vocabulary neither hang nor fill memory, and a shape bomb is refused before allocating."""
    fifo = copy_dir(pristine["llama"][0], tmp_path / "fifo")
    (fifo / "lmshrink.json").unlink()
    os.mkfifo(fifo / "lmshrink.json")
    zero = copy_dir(pristine["lstm"][0], tmp_path / "zero")
    (zero / "vocab.json").unlink()
    (zero / "vocab.json").symlink_to("/dev/zero")
    bomb = copy_dir(pristine["llama"][0], tmp_path / "bomb")
    content = manifest(bomb)
    content["modules"]["lm_head"]["config"]["rank"] = 10 ** 9
    write_manifest(bomb, content)
    for folder, needle in ((fifo, "lmshrink.json"), (zero, "vocab.json"), (bomb, "'lm_head' (LowRankLinear)")):
        before = tree(tmp_path)
        assert_one_line_error(run_cli("inspect", folder, "--json", cwd=work), needle)
        assert tree(tmp_path) == before
