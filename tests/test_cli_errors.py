"""Every bad option value, output location and usage mistake: one line `error: ARG: ...; allowed: ...`, exit 2,
no traceback, nothing written. Most cases run in-process (click's runner) for speed; a few through
`python -m lmshrink` check the real streams."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lmshrink
from tests.conftest import byte_tokenizer, invoke_cli, tiny_llama


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny LLaMA directory (128 positions), a tiny BERT directory and two texts."""
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("cli-errors")
    lmshrink.save(tiny_llama(), root / "llama")
    torch.manual_seed(0)
    bert = BertModel(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                vocab_size=256, max_position_embeddings=64)).eval()
    lmshrink.save(lmshrink.load_model(bert, tokenizer=byte_tokenizer()), root / "bert")
    (root / "text.txt").write_text("hello world, this is a line of text with words in it\n" * 300)
    (root / "short.txt").write_text("two words\n" * 600)
    (root / "file.txt").write_text("a regular file")
    return root


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def assert_one_line(result, argument: str, *words: str):
    # Stage lines ("lmshrink [ 0:01] loading ...") say what ran before the failure; the failure itself is one line.
    lines = [line for line in result.stderr.splitlines() if not line.startswith("lmshrink [")]
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.output)
    assert len(lines) == 1 and lines[0].startswith(f"error: {argument}: ") and "; allowed: " in lines[0], result.stderr
    assert "Traceback" not in result.stderr and "Usage:" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


COMPRESS = ("compress", "llama", "--method", "svd", "--ratio", "0.5", "--data", "text.txt", "--tokens", "64", "--window", "16",
            "--out", "out")

BAD_VALUES = [
    (("--threads", "100000", "eval", "llama"), "--threads", "100,000 is outside [1, "),
    (("--threads", "0", "eval", "llama"), "--threads", "0 is outside [1, "),
    (COMPRESS + ("--max-shift", "1e308"), "--max-shift", "1e+308 is outside [0, 100]"),
    (COMPRESS + ("--finetune-steps", "1", "--finetune-lr", "inf"), "--finetune-lr", "inf is not a finite number"),
    (COMPRESS + ("--finetune-lr", "1e308"), "--finetune-lr", "1e+308 is outside (0, 1]"),
    (COMPRESS + ("--finetune-lr", "nan"), "--finetune-lr", "nan is not a finite number"),
    (COMPRESS + ("--finetune-lr", "-1"), "--finetune-lr", "-1 is outside (0, 1]"),
    (COMPRESS[:3] + ("quantize",) + COMPRESS[4:] + ("--quant-group", "-1"), "--quant-group", "-1 is outside [0, 1,048,576]"),
    (COMPRESS[:3] + ("fwhiten",) + COMPRESS[4:] + ("--whiten-damping", "inf"), "--whiten-damping", "inf is not a finite number"),
    (COMPRESS[:3] + ("tfwsvd",) + COMPRESS[4:] + ("--tfwsvd-lr", "nan"), "--tfwsvd-lr", "nan is not a finite number"),
    (COMPRESS + ("--weight-power", "nan"), "--weight-power", "nan is not a finite number"),
    (COMPRESS + ("--weight-power", "inf"), "--weight-power", "inf is not a finite number"),
    (COMPRESS + ("--power-iterations", "1000000"), "--power-iterations", "1,000,000 is outside [0, 100]"),
    (COMPRESS + ("--tokens", "1000000000000"), "--tokens", "is outside [2, 100,000,000]"),
    (COMPRESS + ("--window", "100000000"), "--window", "is outside [2, 1,048,576]"),
    (COMPRESS + ("--calibration-windows", "10000000000"), "--calibration-windows", "is outside [1, 65,536]"),
    (COMPRESS + ("--ratio", "nan"), "--ratio", "nan is not a finite number"),
    (COMPRESS + ("--ratio", "abc"), "--ratio", "'abc' is not a number"),
    (COMPRESS + ("--rank", "2.5"), "--rank", "'2.5' is not an integer"),
    (COMPRESS + ("--energy", "inf"), "--energy", "inf is not a finite number"),
    (COMPRESS + ("--multiple-of", "0"), "--multiple-of", "0 is outside [1, 65,536]"),
    (COMPRESS + ("--params", "-5"), "--params", "-5 is below 1"),
    (COMPRESS + ("--tt-order", "0"), "--tt-order", "0 is outside [1, 16]"),
    (COMPRESS + ("--tt-tolerance", "1"), "--tt-tolerance", "1 is outside (0, 1)"),
    (COMPRESS + ("--seminmf-iterations", "0"), "--seminmf-iterations", "0 is outside [1, 100,000]"),  # was "max_iter"
    (COMPRESS + ("--seminmf-tol", "nan"), "--seminmf-tol", "nan is not a finite number"),  # was "tol"
    (COMPRESS + ("--asvd-alpha", "3"), "--asvd-alpha", "3 is outside [0, 2]"),  # was "alpha"
    (COMPRESS + ("--tfwsvd-adam-steps", "-1"), "--tfwsvd-adam-steps", "-1 is outside [0, 100,000]"),  # was "adam_steps"
    (COMPRESS + ("--groups", "0"), "--groups", "0 is outside [1, 65,536]"),
    (COMPRESS + ("--split", "zigzag"), "--split", "'zigzag' is not one of"),
    # usage mistakes click itself reports
    (COMPRESS + ("--no-such-flag",), "--no-such-flag", "no such option"),
    (COMPRESS + ("--ratoi", "0.5"), "--ratoi", "close matches: --data, --rank, --ratio"),
    (("compress", "llama", "--out"), "--out", "needs a value"),
    (("eval",), "MODEL", "missing"),
    (("frobnicate",), "COMMAND", "no such command 'frobnicate'"),
    (("import-lm", "nope.pt", "--corpus", "ptb", "--out", "x"), "CHECKPOINT", "does not exist"),
    # windows and data
    (COMPRESS + ("--window", "100"), "--window", "100 tokens is longer than --tokens 64"),
    (COMPRESS + ("--window", "200", "--tokens", "400"), "--window", "longer than the model's 128 positions"),
    (("eval", "llama", "--window", "200", "--tokens", "400", "--data", "text.txt"), "--window", "the model's 128 positions"),
    (COMPRESS[:7] + ("/dev/null",) + COMPRESS[8:], "--data", "not a regular file or folder"),
    (("eval", "llama", "--data", "/dev/null"), "--data", "not a regular file or folder"),
    (("compress", "bert", "--method", "svd", "--ratio", "0.5", "--data", "short.txt", "--window", "32", "--out", "out"),
     "--data", "no line of 8 words or more"),
    # output locations
    (COMPRESS[:-1] + ("",), "--out", "is empty"),
    (COMPRESS[:-1] + ("file.txt/out",), "--out", "which is a file, not a directory"),
    (COMPRESS[:-1] + ("file.txt",), "--out", "is a file, not a directory"),
    (COMPRESS[:-1] + ("/proc/lmshrink-out",), "--out", "is in /proc, a virtual file system"),
    (COMPRESS[:-1] + ("/sys/lmshrink-out",), "--out", "is in /sys, a virtual file system"),
    (COMPRESS[:-1] + ("llama/sub",), "--out", "is inside the input model"),
    (COMPRESS[:-1] + ("llama", "--overwrite"), "--out", "is the input model"),
    (COMPRESS[:-1] + (".",), "--out", "contains the input model"),
]


@pytest.mark.parametrize("args,argument,words", BAD_VALUES, ids=[" ".join(a[-3:]) for a, _, _ in BAD_VALUES])
def test_bad_value_one_line_nothing_written(workspace, args, argument, words):
    before = listing(workspace)
    result = invoke_cli(workspace, *args)
    assert_one_line(result, argument, words)
    assert result.stdout == ""
    assert listing(workspace) == before  # no output, no partial or lock sibling, no compressed/ folder


def test_existing_outputs_are_never_replaced_without_overwrite(workspace, tmp_path):
    # The default output is an output like any other: a file the user put there survives (20.5).
    default = tmp_path / "compressed" / "llama-svd"
    default.mkdir(parents=True)
    (default / "notes.txt").write_text("mine")
    model = str(workspace / "llama")
    result = invoke_cli(tmp_path, "compress", model, "--method", "svd", "--ratio", "0.5", "--data", str(workspace / "text.txt"),
                    "--tokens", "64", "--window", "16")
    assert_one_line(result, "--out", "exists and is not empty", "--overwrite")
    # With --overwrite a directory lmshrink did not write is still refused.
    result = invoke_cli(tmp_path, "compress", model, "--method", "svd", "--ratio", "0.5", "--data", str(workspace / "text.txt"),
                    "--tokens", "64", "--window", "16", "--overwrite")
    assert_one_line(result, "--out", "is not an lmshrink directory")
    assert listing(tmp_path) == ["compressed", "compressed/llama-svd", "compressed/llama-svd/notes.txt"]
    assert (default / "notes.txt").read_text() == "mine"


def test_help_still_works(workspace):
    result = invoke_cli(workspace, "compress", "--help")
    assert result.exit_code == 0 and "Usage:" in result.output and "--finetune-lr" in result.output
    result = invoke_cli(workspace)
    assert "Usage:" in result.output and "compress" in result.output


def test_method_with_nonfinite_result_fails_and_saves_nothing(workspace, monkeypatch):
    import lmshrink.methods.svd

    def nan_factors(weight, rank, **kwargs):
        return torch.full((weight.shape[0], rank), math.nan), torch.zeros(rank, weight.shape[1])

    monkeypatch.setattr(lmshrink.methods.svd, "truncated_svd", nan_factors)
    before = listing(workspace)
    result = invoke_cli(workspace, *COMPRESS, "--json")
    assert_one_line(result, "--method", "method 'svd' left NaN or inf in 14 tensors", "nothing was saved")
    assert result.stdout == "" and listing(workspace) == before


def test_diverging_refinement_training_fails_and_saves_nothing(workspace, monkeypatch):
    def nan_step(self, closure=None):
        for group in self.param_groups:
            for param in group["params"]:
                param.data.fill_(math.nan)

    monkeypatch.setattr(torch.optim.AdamW, "step", nan_step)
    before = listing(workspace)
    result = invoke_cli(workspace, *COMPRESS, "--finetune-steps", "2")
    assert_one_line(result, "--finetune-lr", "training diverged: step 1", "a smaller learning rate")
    assert listing(workspace) == before


def test_save_refuses_nonfinite_weights(tmp_path):
    loaded = tiny_llama()
    with torch.no_grad():
        loaded.model.model.layers[0].mlp.up_proj.weight[0, 0] = math.inf
    with pytest.raises(lmshrink.errors.InvalidArgument, match=r"model: 1 tensors hold NaN or inf \(model.layers.0.mlp.up_proj.weight\)"):
        lmshrink.save(loaded, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_json_is_strict_even_with_nonfinite_figures(workspace, monkeypatch):
    import lmshrink.evaluate

    monkeypatch.setattr(lmshrink.evaluate, "corpus_perplexity", lambda *a, **k: {"perplexity": math.nan, "tokens": 60, "protocol": "stub"})
    result = invoke_cli(workspace, "eval", "llama", "--data", "text.txt", "--tokens", "64", "--window", "16", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout, parse_constant=lambda name: pytest.fail(f"bare {name} in JSON"))
    assert report["perplexity"] is None
    assert report["notes"] == ["not finite, reported as null: perplexity (nan)"]


def run(*args, cwd):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})


def test_real_streams_one_line_and_json_alone_on_stdout(workspace):
    # Through a real process: click's usage errors and lmshrink's own are one line on stderr.
    result = run("-m", "lmshrink", "compress", "llama", "--finetune-lr", "inf", cwd=workspace)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == ["error: --finetune-lr: inf is not a finite number; allowed: a finite number > 0 and <= 1"]
    # With --json, whatever else writes to stdout during the work (a library's print, a C-level write) goes to
    # stderr: stdout holds the JSON object alone.
    script = (
        "import os, lmshrink\n"
        "load = lmshrink.load_model\n"
        "def noisy(*a, **k):\n"
        "    print('Do you wish to run the custom code? [y/N]')\n"
        "    os.write(1, b'a C-level notice\\n')\n"
        "    return load(*a, **k)\n"
        "lmshrink.load_model = noisy\n"
        "from lmshrink.cli import main\n"
        "main(['eval', 'llama', '--data', 'text.txt', '--tokens', '64', '--window', '16', '--json'], prog_name='lmshrink')\n"
    )
    result = run("-c", script, cwd=workspace)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["eval_tokens"] == 60 and math.isfinite(report["perplexity"])
    assert "custom code" in result.stderr and "a C-level notice" in result.stderr
