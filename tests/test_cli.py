"""The command line, as a user runs it: output shapes, JSON, and one-line errors that write nothing."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import saved_weights, tiny_llama


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "lmshrink", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    import lmshrink

    folder = tmp_path_factory.mktemp("tiny") / "llama"
    loaded = tiny_llama()
    lmshrink.save(loaded, folder)
    return folder


@pytest.mark.parametrize(
    "args,message",
    [
        (["--rank", "0"], "--rank: 0 is below 1"),
        (["--rank", "65"], "--rank (for model.layers.0.self_attn.q_proj, 64x64): 65 does not fit"),
        (["--ratio", "1.5"], "--ratio: 1.5 is outside (0, 1]"),
        (["--energy", "0"], "--energy: 0 is outside (0, 1]"),
        (["--ratio", "0.5", "--targets", "mpl"], "close matches: mlp"),
        (["--method", "svd", "--ratio", "0.5", "--tt-max-rank", "3"], "--tt-max-rank: not an option of method 'svd'"),
        (["--method", "svd", "--ratio", "0.5", "--finetune-steps", "2", "--finetune-lr", "0"], "--finetune-lr: 0 is outside (0, 1]"),
        (["--method", "svd", "--ratio", "0.5", "--allocation", "sensitivity", "--max-shift", "-1"],
         "--max-shift: -1 is outside [0, 100]"),
        (["--method", "svd", "--params", "100000000"], "--params: 100,000,000 is not below the"),
        (["--method", "svd", "--ratio", "0.5", "--params", "1000"], "ratio and params given"),
        (["--method", "svd", "--ratio", "0.5", "--untie-head"], "--untie-head: no targeted embedding shares its weight"),
    ],
)
def test_bad_input_one_line_error_nothing_written(tiny_dir, tmp_path, args, message):
    text = tmp_path / "text.txt"
    text.write_text("hello world, this is text\n" * 500)
    out = tmp_path / "out"
    result = run("compress", str(tiny_dir), "--data", str(text), "--out", str(out), "--tokens", "64", "--window", "16", *args)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not out.exists()


def test_compress_with_refinement_training_lowers_the_loss_and_saves(tiny_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat and the dog sat on the log.\n" * 400)
    out = tmp_path / "out"
    result = run("compress", str(tiny_dir), "--method", "svd", "--ratio", "0.5", "--data", str(text), "--out", str(out),
                 "--tokens", "64", "--window", "32", "--finetune-steps", "12", "--finetune-lr", "1e-2", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["finetune"]["loss"] == "next-token"
    distilled = run("compress", str(tiny_dir), "--method", "svd", "--ratio", "0.5", "--data", str(text), "--no-save",
                    "--tokens", "64", "--window", "32", "--finetune-steps", "3", "--finetune-distill", "--json")
    assert distilled.returncode == 0, distilled.stderr
    assert json.loads(distilled.stdout)["finetune"]["loss"].startswith("distillation")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    tuned = report["finetune"]
    assert tuned["steps"] == 12 and tuned["tokens"] == 12 * 32 and tuned["trained_parameters"] > 0
    assert tuned["last_loss"] < tuned["first_loss"] - 0.3  # repetitive text: the factors learn it fast (nats)
    again = run("eval", str(out), "--data", str(text), "--tokens", "64", "--window", "32", "--json")
    assert again.returncode == 0, again.stderr
    assert abs(json.loads(again.stdout)["perplexity"] - report["perplexity"]["after"]) < 1e-4 * report["perplexity"]["after"]


def test_groupreduce_with_quantized_factors_from_the_command_line(tiny_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("a few words of text, and then a few more words of text.\n" * 300)
    out = tmp_path / "out"
    result = run("compress", str(tiny_dir), "--method", "groupreduce", "--targets", "embedding", "--targets", "lm_head",
                 "--ratio", "0.4", "--groups", "4", "--bits", "8", "--data", str(text), "--out", str(out),
                 "--tokens", "64", "--window", "32", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    layers = {m["name"]: m["layer"] for m in report["modules"]}
    assert layers == {"model.embed_tokens": "BlockLowRankEmbedding", "lm_head": "BlockLowRankOutput"}
    assert report["bytes"]["after"] < report["bytes"]["before"]
    from safetensors import safe_open

    with safe_open(str(saved_weights(out)), "pt") as weights:  # the factors really are stored as 8-bit integers
        dtypes = {weights.get_tensor(k).dtype for k in weights.keys() if k.startswith("model.embed_tokens.")}
    assert torch.uint8 in dtypes and torch.float32 not in dtypes
    manifest = json.loads((out / "lmshrink.json").read_text())
    assert manifest["modules"]["model.embed_tokens"]["config"]["frequencies"]["tokens"] > 0
    again = run("eval", str(out), "--data", str(text), "--tokens", "64", "--window", "32", "--json")
    assert again.returncode == 0, again.stderr
    evaluated = json.loads(again.stdout)
    assert evaluated["bytes"] == report["bytes"]["after"]
    assert abs(evaluated["perplexity"] - report["perplexity"]["after"]) < 1e-4 * report["perplexity"]["after"]


def test_not_a_model_and_missing_data(tmp_path):
    result = run("eval", str(tmp_path))
    assert result.returncode == 2 and "is not a model" in result.stderr
    result = run("eval", "smollm2-135m", "--data", str(tmp_path / "nope.txt"))
    assert result.returncode == 2 and "--data" in result.stderr and "does not exist" in result.stderr


def test_inspect_json(tiny_dir):
    result = run("inspect", str(tiny_dir), "--json", "--targets", "attention")
    assert result.returncode == 0, result.stderr
    matrices = json.loads(result.stdout)["matrices"]
    assert len(matrices) == 8
    for row in matrices:
        assert 1 <= row["effective_rank"] <= min(row["shape"])
        assert 0 < row["energy@0.4"] < row["energy@0.6"] < row["energy@0.9"] <= 1


def test_compress_and_eval_real_smollm2_json(tmp_path):
    out = tmp_path / "smol"
    result = run("compress", "smollm2-135m", "--method", "svd", "--ratio", "0.9", "--targets", "model.layers.2?.mlp.*",
                 "--data", "pydoc", "--out", str(out), "--tokens", "1024", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for key in ("params", "bytes", "perplexity", "tokens_per_s"):
        assert report[key]["before"] > 0 and report[key]["after"] > 0
    assert report["params"]["after"] < report["params"]["before"]
    assert report["bytes"]["after"] == 4 * report["params"]["after"]  # float32 factors, nothing else stored
    assert report["perplexity"]["after"] > report["perplexity"]["before"]
    assert report["saved_to"] == str(out.resolve()) and (out / "lmshrink.json").is_file()
    result = run("eval", str(out), "--data", "pydoc", "--tokens", "1024", "--json")
    assert result.returncode == 0, result.stderr
    evaluated = json.loads(result.stdout)
    assert evaluated["params"] == report["params"]["after"]
    assert abs(evaluated["perplexity"] - report["perplexity"]["after"]) / report["perplexity"]["after"] < 1e-4
