"""A new user's first hour (issue 19): the README's commands on a machine without ../shared, signs of life,
what the main job prints, inspect on a compressed directory, the LSTM target groups, the cache command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner

import lmshrink
from conftest import tiny_llama
from lmshrink.cli import main
from lmshrink.errors import InvalidArgument

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def fresh_env(tmp_path, **extra):
    """A child environment without the shared data folder: LMSHRINK_DATA points nowhere (it wins over the
    walk-up that would find ../shared from the working directory or the package), and a private cache."""
    return {**os.environ, "PYTHONPATH": SRC, "LMSHRINK_DATA": str(tmp_path / "no-such-folder"),
            "LMSHRINK_CACHE": str(tmp_path / "cache"), "TOKENIZERS_PARALLELISM": "false", **extra}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fresh") / "llama"
    lmshrink.save(tiny_llama(), folder)  # stands in for SmolLM2: same family, a byte tokenizer, seconds to run
    return folder


def test_pydoc_corpus_is_english_prose_split_by_topic():
    corpus = lmshrink.load_corpus("pydoc")
    assert corpus.name == "pydoc" and "English prose" in corpus.source
    assert len(corpus.train) > 300_000 and len(corpus.test) > 30_000
    assert 0.85 < len(corpus.train) / (len(corpus.train) + len(corpus.test)) <= 0.9
    assert " the " in corpus.test and corpus.test.count(" the ") > 200  # prose, not code (3.11: 287)
    from pydoc_data.topics import topics

    first_test_topic = corpus.test.split("\n", 1)[0]
    assert any(text.strip().startswith(first_test_topic) for text in topics.values())  # cut at a topic boundary


def test_default_corpus_without_shared_data_is_pydoc(monkeypatch, tmp_path):
    monkeypatch.setenv("LMSHRINK_DATA", str(tmp_path / "nowhere"))
    assert lmshrink.data.default_corpus_name() == "pydoc" and lmshrink.load_corpus().name == "pydoc"
    with pytest.raises(InvalidArgument, match="'wikitext-2' not found"):
        lmshrink.load_corpus("wikitext-2")


def test_readme_python_example_without_shared_data_in_a_child(tmp_path, tiny_dir):
    # The README's Python example with the tiny model for SmolLM2 and fewer windows; corpus resolution is the
    # real default path (no data argument), run where no shared folder can be found.
    script = textwrap.dedent(f"""
        import json, lmshrink
        from lmshrink.evaluate import corpus_perplexity

        loaded = lmshrink.load_model({str(tiny_dir)!r})
        plan = lmshrink.Plan(method="fwhiten", ratio=0.8, targets=("linears",), allocation="sensitivity",
                             calibration_windows=2, window=32)
        report = lmshrink.compress(loaded, plan, progress=False)
        lmshrink.save(loaded, "smollm2-fw")
        again = lmshrink.load("smollm2-fw")
        corpus = lmshrink.load_corpus()
        result = corpus_perplexity(again, corpus, tokens=256, window=32, progress=False)
        print(json.dumps({{"corpus": corpus.name, "factorized": len(report.compressed), "perplexity": result["perplexity"],
                          "protocol": result["protocol"]}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=fresh_env(tmp_path), timeout=900)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["corpus"] == "pydoc" and 0 < result["factorized"] <= 14  # small matrices may stay dense at 0.8
    assert 1 < result["perplexity"] < 1000 and "non-overlapping windows of 32" in result["protocol"]


@pytest.fixture(scope="module")
def default_job(tmp_path_factory, tiny_dir):
    """`lmshrink compress --recipe channels` as the README runs it (no --data), on the tiny model, output not a
    terminal, no shared folder; 8 calibration windows so that one of them is sampled from the model (an eighth)."""
    tmp_path = tmp_path_factory.mktemp("job")
    done = subprocess.run([sys.executable, "-m", "lmshrink", "compress", str(tiny_dir), "--recipe", "channels",
                           "--calibration-windows", "8", "--window", "32", "--tokens", "256", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=tmp_path, env=fresh_env(tmp_path, COLUMNS="100"), timeout=900)
    assert done.returncode == 0, done.stderr
    return done, tmp_path / "out", tmp_path


def test_default_job_says_its_text_first_and_prints_stage_lines(default_job):
    done, _, _ = default_job
    lines = [line for line in done.stderr.splitlines() if line.startswith("lmshrink [")]
    assert lines[0].endswith("English prose; 90% calibration / 10% evaluation)") and "text: Python" in lines[0]
    stages = [line.split("] ", 1)[1] for line in lines]
    expected = ["loading", "sampling the original", "evaluating the original", "recipe stage 1/2: nystrom on mlp",
                "calibrating (input_gram, output_grad_gram over 8 windows of 32 tokens, 0.125 of them sampled from the model)",
                "factorizing 6 matrices (nystrom)", "recipe stage 2/2: fwhiten on attention", "evaluating the compressed model", "timing tokens/s", "sampling the compressed model", "saving to", "done"]
    positions = [next(i for i, stage in enumerate(stages) if stage.startswith(word)) for word in expected]
    assert positions == sorted(positions)  # one line per stage, in the order the job runs them
    clock = [line[len("lmshrink ["):].split("]")[0] for line in lines]
    assert all(":" in c for c in clock) and clock == sorted(clock, key=lambda c: tuple(map(int, c.split(":"))))


def test_default_job_prints_samples_sizes_on_disk_and_how_speed_was_measured(default_job):
    done, out, _ = default_job
    text = done.stdout
    assert "data: Python" in text and "greedy sample, 24 new tokens after 'The capital of France is'" in text
    assert "  original:   " in text and "  compressed: " in text
    assert "bytes on disk" in text and "bytes in memory" in text and f"after, the saved directory ({out.resolve()})" in text
    assert "tokens/s: forward pass of 256 tokens, median ± half the range" in text and "7 rounds alternating" in text
    assert "perplexity: 8 non-overlapping windows of 32" in text


def test_json_has_samples_sizes_and_speed(tiny_dir, tmp_path):
    done = subprocess.run([sys.executable, "-m", "lmshrink", "compress", str(tiny_dir), "--method", "svd", "--ratio", "0.5",
                           "--tokens", "128", "--window", "32", "--out", str(tmp_path / "out"), "--json"],
                          capture_output=True, text=True, cwd=tmp_path, env=fresh_env(tmp_path), timeout=900)
    assert done.returncode == 0, done.stderr
    assert not done.stderr.strip()  # --json: no stage lines either
    report = json.loads(done.stdout)
    saved = sum(p.stat().st_size for p in (tmp_path / "out").rglob("*") if p.is_file())
    source = sum(p.stat().st_size for p in tiny_dir.rglob("*") if p.is_file())
    assert report["on_disk"] == {"source": source, "source_path": str(tiny_dir), "saved": saved}
    assert report["samples"]["prompt"] == "The capital of France is" and isinstance(report["samples"]["after"], str)
    speed = report["speed"]
    assert speed["before"]["repeats"] == speed["after"]["repeats"] == 7 and "alternating" in speed["method"]
    assert report["tokens_per_s"]["before"] == speed["before"]["tokens_per_s"] and speed["speedup"] > 0
    assert isinstance(speed["noisy"], bool) and speed["before"]["spread"] >= 0


def test_inspect_on_a_compressed_directory_lists_factorized_targets_with_ranks(default_job):
    done, out, tmp_path = default_job
    env = fresh_env(tmp_path)
    listed = subprocess.run([sys.executable, "-m", "lmshrink", "inspect", str(out), "--json"], capture_output=True, text=True, env=env)
    assert listed.returncode == 0, listed.stderr
    rows = {row["name"]: row for row in json.loads(listed.stdout)["matrices"]}
    manifest = json.loads((out / "lmshrink.json").read_text())
    factorized = {row["name"]: row for row in manifest["compression"] if row["status"] == "factorized"}
    mlp = {name for name in factorized if ".mlp." in name}
    assert len(mlp) == 6 and 6 < len(factorized) <= 14 and len(rows) == 15  # 14 linears + the embedding (dense)
    for name, row in factorized.items():
        assert rows[name]["layer"] == row["layer"] == ("ChannelLinear" if name in mlp else "LowRankLinear")
        assert rows[name]["params"] == row["params_after"] < rows[name]["dense_params"] == row["params_before"]
        m, n = rows[name]["shape"]
        if name in mlp:  # the same kept channels in gate, up (rows) and down (columns): 0.8 of 128
            assert rows[name]["rank"] is None and row["params_after"] == round(0.8 * 128) * 64
        else:
            assert rows[name]["rank"] == row["rank"] and rows[name]["params"] == row["rank"] * (m + n)
    assert rows["model.embed_tokens"]["layer"] == "dense" and rows["model.embed_tokens"]["effective_rank"] > 1
    narrow = subprocess.run([sys.executable, "-m", "lmshrink", "inspect", str(out)], capture_output=True, text=True,
                            env={**env, "COLUMNS": "80"})
    assert narrow.returncode == 0, narrow.stderr
    assert "…" not in narrow.stdout and max(len(line) for line in narrow.stdout.splitlines()) <= 80
    assert narrow.stdout.count("ChannelLinear") == 6 and f"15 targets, {len(factorized)} factorized" in narrow.stdout
    assert "left out to fit 80 columns: energy@" in narrow.stdout


def _tiny_lstm():
    from lmshrink.models import FAMILIES, LoadedModel
    from lmshrink.models.lstm import RNNModel, Vocabulary

    torch.manual_seed(0)
    return LoadedModel(RNNModel(20, 8, 8, 2, dropout=0.0), FAMILIES["word-lstm"], Vocabulary([f"w{i}" for i in range(20)]), "tiny-lstm")


def test_lstm_default_targets_error_names_the_lstm_groups():
    with pytest.raises(InvalidArgument) as caught:
        lmshrink.compress(_tiny_lstm(), lmshrink.Plan(method="svd", ratio=0.5), progress=False)  # targets=("linears",)
    message = str(caught.value)
    assert message.startswith("--targets: group 'linears' (attention, mlp) matches no module of this model")
    assert "groups this model has: embedding, lm_head, W_i, W_h, lstm" in message and "close matches" not in message
    report = lmshrink.compress(_tiny_lstm(), lmshrink.Plan(method="svd", ratio=0.5, targets=("lstm",)), progress=False)
    assert [row["name"] for row in report.compressed] == ["rnn.ih_l0", "rnn.hh_l0", "rnn.ih_l1", "rnn.hh_l1"]


def test_help_and_methods_name_the_lstm_groups_and_allocations():
    runner = CliRunner()
    help_text = " ".join(runner.invoke(main, ["compress", "--help"]).output.split())
    assert "W_i, W_h, lstm" in help_text and "sensitivity" in help_text
    listed = runner.invoke(main, ["methods"]).output
    allocations = listed.split("allocations (--allocation):")[1]
    assert allocations.split()[0] == "uniform" and "\nsensitivity " in allocations


def test_top_level_help_names_every_built_in_model_and_text():
    from lmshrink.models.builtin import BUILTINS

    help_text = " ".join(CliRunner().invoke(main, ["--help"], terminal_width=400).output.split())
    assert "gemma3-270m" in BUILTINS and all(name in help_text for name in BUILTINS)
    assert all(f"'{name}'" in help_text for name in ("wikitext-2", "ptb", "pydoc", "stdlib")) and "+self" in help_text


def test_cache_lists_and_clears(tmp_path, monkeypatch):
    from lmshrink.calibration import collect_stats
    from lmshrink.plan import select_targets

    monkeypatch.setenv("LMSHRINK_CACHE", str(tmp_path))
    loaded = tiny_llama()
    targets = select_targets(loaded.candidates(), ("mlp",))
    collect_stats(loaded, targets, lmshrink.load_corpus("pydoc"), {"fisher", "input_gram"}, windows=2, window_len=32,
                  progress=False, cache=True)
    (tmp_path / "models" / "fake-model").mkdir(parents=True)
    (tmp_path / "models" / "fake-model" / "weights.bin").write_bytes(b"x" * 1000)
    runner = CliRunner()
    listed = json.loads(runner.invoke(main, ["cache", "list", "--json"]).output)
    stats = [e for e in listed["entries"] if e["part"] == "stats"]
    assert sorted(e["about"]["stat"] for e in stats) == ["fisher", "input_gram"]
    assert all(e["about"]["corpus"] == "pydoc" and e["about"]["windows"] == "2x32" for e in stats)
    gram = next(e for e in stats if e["about"]["stat"] == "input_gram")
    assert gram["bytes"] > sum(t.shape[1] ** 2 * 8 for t in targets)  # three float64 (in x in) Gram matrices + header
    assert listed["bytes"] == sum(e["bytes"] for e in listed["entries"]) and {"part": "models", "name": "fake-model"}.items() <= next(
        e for e in listed["entries"] if e["part"] == "models").items()
    text = runner.invoke(main, ["cache", "list"]).output
    assert "stats/: calibration statistics" in text and "fisher of <in-memory> on pydoc (2x32 tokens)" in text
    cleared = runner.invoke(main, ["cache", "clear"])
    assert cleared.exit_code == 0 and cleared.output.startswith("removed 2 entries") and not list((tmp_path / "stats").iterdir())
    assert (tmp_path / "models" / "fake-model").is_dir()  # the default clears statistics only
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "key.safetensors").write_bytes(b"x" * 10)
    assert "samples/: calibration text sampled" in runner.invoke(main, ["cache", "list"]).output
    assert runner.invoke(main, ["cache", "clear", "--samples"]).output.startswith("removed 1 entries (10 B) from samples/")
    assert not list((tmp_path / "samples").iterdir()) and (tmp_path / "models" / "fake-model").is_dir()
    assert runner.invoke(main, ["cache", "clear", "--all"]).output.startswith("removed 1 entries")
    assert not (tmp_path / "models" / "fake-model").exists()


def test_speed_figures_say_when_they_are_noise():
    from lmshrink.evaluate import _speed, speed_label

    steady = _speed([1.0, 1.02, 0.98, 1.0, 1.01], tokens=256, batch_size=1)
    assert steady["tokens_per_s"] == 256 and steady["spread"] == pytest.approx(0.02) and not steady["noisy"]
    busy = _speed([1.0, 2.5, 0.9, 1.0, 1.1], tokens=256, batch_size=1)
    assert busy["noisy"] and speed_label(busy["tokens_per_s"], busy["spread"], busy["noisy"]) == "256 ± 80%, noisy"
    assert speed_label(256.0, 0.02, False) == "256 ± 2%"


def test_compare_throughput_alternates_and_reports_medians():
    from lmshrink.evaluate import compare_throughput

    original = tiny_llama()
    result = compare_throughput(original, original, tokens=32, rounds=3)
    assert result["before"]["repeats"] == result["after"]["repeats"] == 3
    assert result["speedup"] > 0 and "3 rounds alternating" in result["method"]
