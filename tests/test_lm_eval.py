"""lm-evaluation-harness on lmshrink models: a multiple-choice task the test writes itself (YAML + JSONL), run through
`lmshrink eval --tasks`, lmshrink's task checks and the registered lm-eval model "lmshrink"; accuracies checked against
a direct computation of the same log-likelihood comparisons."""

import json
import math
import os
import random
import statistics

import pytest
import torch

pytest.importorskip("lm_eval")

import lmshrink  # noqa: E402
from lmshrink.errors import InvalidArgument  # noqa: E402
from lmshrink.lm_eval_model import evaluate_tasks, task_manager, write_choice_task  # noqa: E402
from tests.conftest import tiny_llama  # noqa: E402

WORDS = ["apple", "river", "stone", "cloud", "tiger", "maple", "ocean", "piano", "lemon", "candle", "forest", "silver"]


def _documents(count=30, seed=0):
    rng = random.Random(seed)
    docs = []
    for i in range(count):
        choices = rng.sample(WORDS, 3)
        docs.append({"question": f"Item {i}: which word comes after {rng.choice(WORDS)}?", "choices": choices,
                     "answer": rng.randrange(3)})
    return docs


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    write_choice_task(folder, "tiny_mc", _documents())
    return folder


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    loaded = tiny_llama()
    # lm-eval's HFLM needs an end-of-text token; the byte tokenizer's byte 0 serves (no new vocabulary entry).
    loaded.tokenizer.eos_token = loaded.tokenizer.convert_ids_to_tokens(0)
    lmshrink.compress(loaded, lmshrink.Plan(ratio=0.5), progress=False)
    return lmshrink.save(loaded, tmp_path_factory.mktemp("llama") / "model")


@torch.no_grad()
def direct_accuracy(loaded, docs):
    """What lm-eval's multiple-choice acc is: for each document, the choice whose continuation ' ' + choice has the
    highest summed log-likelihood after the question; the mean of hits, and its standard error."""
    tokenizer, hits = loaded.tokenizer, []
    for doc in docs:
        context = tokenizer(doc["question"], add_special_tokens=False)["input_ids"]
        scores = []
        for choice in doc["choices"]:
            whole = tokenizer(doc["question"] + " " + choice, add_special_tokens=False)["input_ids"]
            logprobs = loaded.model(input_ids=torch.tensor([whole])).logits[0].log_softmax(-1)
            scores.append(sum(float(logprobs[i - 1, whole[i]]) for i in range(len(context), len(whole))))
        hits.append(float(max(range(len(scores)), key=scores.__getitem__) == doc["answer"]))
    return statistics.mean(hits), statistics.stdev(hits) / math.sqrt(len(hits))


def test_task_accuracy_equals_the_direct_log_likelihood_comparison(llama_dir, tasks_dir):
    loaded = lmshrink.load(llama_dir)
    manager = task_manager(["tiny_mc"], tasks_dir, include_defaults=False)
    result = evaluate_tasks(loaded, ["tiny_mc"], manager)["tiny_mc"]
    accuracy, stderr = direct_accuracy(loaded, _documents())
    assert result["samples"] == 30
    assert result["acc"] == pytest.approx(accuracy, abs=1e-12)
    assert result["acc_stderr"] == pytest.approx(stderr, rel=1e-9)
    assert 0 < accuracy < 1  # a random tiny model: neither all right nor all wrong, so the comparison means something


def test_cli_eval_tasks_prints_accuracy_beside_perplexity(llama_dir, tasks_dir, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from lmshrink.cli import main

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 120)
    args = ["eval", str(llama_dir), "--data", str(text), "--tokens", "128", "--window", "32", "--tasks", "tiny_mc",
            "--include-path", str(tasks_dir), "--limit", "20"]
    result = CliRunner().invoke(main, args + ["--json"])
    assert result.exit_code == 0, (result.stderr, result.exception)
    summary = json.loads(result.stdout)
    accuracy, stderr = direct_accuracy(lmshrink.load(llama_dir), _documents()[:20])
    assert summary["perplexity"] > 1 and summary["tasks"]["tiny_mc"]["samples"] == 20
    assert summary["tasks"]["tiny_mc"]["acc"] == pytest.approx(accuracy, abs=1e-12)
    assert summary["tasks"]["tiny_mc"]["acc_stderr"] == pytest.approx(stderr, rel=1e-9)
    # Unknown names are refused before anything is measured, with lm-eval's close matches (built-in tasks included).
    result = CliRunner().invoke(main, ["eval", str(llama_dir), "--data", str(text), "--tasks", "tiny_mc,hellaswagg",
                                       "--include-path", str(tasks_dir)])
    assert result.exit_code == 2 and result.stdout == ""
    line, = result.stderr.strip().splitlines()
    assert line.startswith("error: --tasks: unknown task 'hellaswagg'; close matches: hellaswag")


def test_task_checks_name_the_problem(llama_dir, tasks_dir, tmp_path):
    with pytest.raises(InvalidArgument, match=r"--tasks: unknown task 'tiny_mcq'; close matches: tiny_mc; allowed:"):
        task_manager(["tiny_mcq"], tasks_dir, include_defaults=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    whole = write_choice_task(tmp_path / "whole", "no_target", _documents()).read_text()
    assert "doc_to_target: answer\n" in whole
    (broken / "no_target.yaml").write_text(whole.replace("doc_to_target: answer\n", ""))
    with pytest.raises(InvalidArgument, match=r"--tasks: task 'no_target' \(.*no_target.yaml\) lacks doc_to_target; allowed: a task YAML"):
        task_manager(["no_target"], broken, include_defaults=False)
    with pytest.raises(InvalidArgument, match="--include-path: .* is not a directory"):
        task_manager(["tiny_mc"], tmp_path / "nowhere", include_defaults=False)


def test_registered_lm_eval_model_lmshrink(llama_dir, tasks_dir):
    import lm_eval

    import lmshrink.lm_eval_model  # noqa: F401  (registers "lmshrink" with lm-eval)

    manager = task_manager(["tiny_mc"], tasks_dir, include_defaults=False)
    output = lm_eval.simple_evaluate(model="lmshrink", model_args=f"pretrained={llama_dir}", tasks=["tiny_mc"],
                                     task_manager=manager, device="cpu", batch_size=4)
    accuracy, _ = direct_accuracy(lmshrink.load(llama_dir), _documents())
    assert output["results"]["tiny_mc"]["acc,none"] == pytest.approx(accuracy, abs=1e-12)


@pytest.mark.parametrize("entry", ["lm_eval", "lmshrink.lm_eval_model"])
def test_lm_eval_command_line_with_the_lmshrink_model(llama_dir, tasks_dir, entry):
    """lm-eval's own CLI in a fresh process, as `lm_eval` (the model registered by the installed
    lmshrink_lm_eval.pth) and as `lmshrink-lm-eval`: the model "lmshrink" is found and scores the task."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", entry, "run", "--model", "lmshrink", "--model_args",
                           f"pretrained={llama_dir}", "--tasks", "tiny_mc", "--include_path", str(tasks_dir), "--device", "cpu",
                           "--batch_size", "4"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    accuracy, _ = direct_accuracy(lmshrink.load(llama_dir), _documents())
    row = next(line for line in done.stdout.splitlines() if "tiny_mc" in line and "acc" in line)
    assert f"{accuracy:.4f}" in row, row


def test_the_lm_eval_hook_imports_nothing_heavy_and_can_be_turned_off(llama_dir):
    import subprocess
    import sys

    probe = "import sys; print(sorted(m for m in ('torch', 'lmshrink', 'lm_eval') if m in sys.modules))"
    started = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert started.returncode == 0 and started.stdout.strip() == "[]", started  # interpreter start stays cheap
    registry = ("from lm_eval.api.registry import get_model; import lm_eval.models\n"
                "try:\n    print(get_model('lmshrink').__name__)\nexcept ValueError:\n    print('absent')")
    found = subprocess.run([sys.executable, "-c", registry], capture_output=True, text=True, timeout=600)
    assert found.stdout.strip() == "LmshrinkLM", found.stderr[-2000:]
    off = subprocess.run([sys.executable, "-c", registry], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "LMSHRINK_NO_LM_EVAL_HOOK": "1"})
    assert off.stdout.strip() == "absent", off.stderr[-2000:]


def test_the_pth_line_is_silent_when_its_module_is_gone(tmp_path):
    """A moved or deleted checkout leaves the installed .pth behind: Python must still start without a traceback."""
    import subprocess
    import sys
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src"
    line = (src / "lmshrink_lm_eval.pth").read_text().strip()
    assert line.startswith("import ") and "\n" not in line  # site.py executes only one-line "import ..." entries
    probe = f"{line}\nimport sys; print('_lmshrink_lm_eval' in sys.modules)"
    for path, expected in ((tmp_path, "False"), (src, "True")):
        done = subprocess.run([sys.executable, "-S", "-c", probe], capture_output=True, text=True, timeout=120,
                              cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(path)})
        assert done.returncode == 0 and done.stderr == "" and done.stdout.strip() == expected, done
