"""Output directories: the overwrite swap interrupted at every step, locks between processes, stale siblings,
SIGTERM during a save, the user's umask, and the train-lm lock."""

import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import lmshrink
from lmshrink import outputs
from lmshrink.errors import InvalidArgument
from tests.conftest import saved_weights, tiny_llama

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models():
    """Two tiny LLaMAs with different weights: the old and the new content of one output."""
    return tiny_llama(seed=0), tiny_llama(seed=1)


@pytest.fixture(scope="module")
def weight_bytes(models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    return tuple(saved_weights(lmshrink.save(model, folder / name)).read_bytes()
                 for model, name in zip(models, ("old", "new")))


def content(out: Path, weight_bytes) -> str:
    """'old' or 'new' if ``out`` holds that complete model (it loads, its weights are those); fails otherwise."""
    assert out.is_dir(), f"{out} is missing"
    data = saved_weights(out).read_bytes()
    assert data in weight_bytes, "the weights are neither the old nor the new model's"
    lmshrink.load(out)
    return "old" if data == weight_bytes[0] else "new"


def siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


class _Os:
    """os, with ``rename`` replaced (outputs.os is swapped for this, so no other module is affected)."""

    def __init__(self, rename):
        self.rename = rename

    def __getattr__(self, name):
        return getattr(os, name)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_overwrite_interrupted_at_every_step_keeps_the_old_or_the_new_model(tmp_path, monkeypatch, models, weight_bytes, exchange):
    out = tmp_path / "out"
    lmshrink.save(models[0], out)
    real_exchange = outputs._exchange
    if exchange:
        assert real_exchange(tmp_path, tmp_path) is True  # this machine has the exchange rename: the test covers it
    else:
        monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
    real_rmtree = shutil.rmtree
    outcomes = []
    for step in range(1, 20):
        calls = []

        def interrupt_at(kind, function):
            def wrapped(*args, **kwargs):
                calls.append(kind)
                if len(calls) == step:
                    raise KeyboardInterrupt
                return function(*args, **kwargs)
            return wrapped

        monkeypatch.setattr(outputs, "os", _Os(interrupt_at("rename", os.rename)))
        monkeypatch.setattr(outputs.shutil, "rmtree", interrupt_at("rmtree", real_rmtree))
        if exchange:
            monkeypatch.setattr(outputs, "_exchange", interrupt_at("exchange", real_exchange))
        try:
            lmshrink.save(models[1], out, overwrite=True)
            interrupted = False
        except KeyboardInterrupt:
            interrupted = True
        monkeypatch.undo()
        if not exchange:
            monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
        outcomes.append((calls[step - 1] if interrupted else "done", content(out, weight_bytes)))
        # The next run cleans whatever the interrupted one left beside the output.
        with outputs.reserve(out, overwrite=True):
            pass
        assert siblings(out) == []
        if not interrupted:
            break
        lmshrink.save(models[0], out, overwrite=True)
        assert content(out, weight_bytes) == "old"
    if exchange:  # exchange, then removing the old copy (now in the staging dir)
        assert outcomes == [("exchange", "old"), ("rmtree", "new"), ("done", "new")]
    else:  # out -> .out.old, staging -> out (rolled back when interrupted), removing .out.old
        assert outcomes == [("rename", "old"), ("rename", "old"), ("rmtree", "new"), ("done", "new")]


def test_crash_between_the_two_renames_is_repaired_at_the_next_start(tmp_path, models, weight_bytes):
    out = tmp_path / "out"
    lmshrink.save(models[0], out)
    # What a process killed between "out -> .out.old" and "staging -> out" leaves: no out at all.
    os.rename(out, tmp_path / ".out.old")
    (tmp_path / ".out.k3j5x_0a.partial").mkdir()
    (tmp_path / ".out.k3j5x_0a.partial" / "model.safetensors").write_bytes(b"half")
    with pytest.raises(InvalidArgument, match="exists and is not empty"):
        lmshrink.save(models[1], out)  # without --overwrite: the old model is back, so it is not replaced
    assert content(out, weight_bytes) == "old" and siblings(out) == []
    os.rename(out, tmp_path / ".out.old")
    lmshrink.save(models[1], out, overwrite=True)
    assert content(out, weight_bytes) == "new" and siblings(out) == []


def test_stale_siblings_are_cleaned_and_others_kept(tmp_path, models, weight_bytes):
    out = tmp_path / "out"
    lmshrink.save(models[0], out)
    shutil.copytree(out, tmp_path / ".out.old")  # a stale old copy: --overwrite used to crash on it (18.5)
    (tmp_path / ".out.abcdefgh.partial").mkdir()  # what a SIGTERMed save left (20.7)
    (tmp_path / ".out.lock").write_text("")  # a lock file whose process died (not locked)
    keep = [".out.notes", ".out.b.abcdefgh.partial", "out.abcdefgh.partial", ".other.abcdefgh.partial"]
    for name in keep:
        (tmp_path / name).mkdir()
    lmshrink.save(models[1], out, overwrite=True)
    assert content(out, weight_bytes) == "new"
    assert siblings(out) == sorted(keep)


def test_check_output_refuses_bad_places(tmp_path):
    (tmp_path / "file").write_text("x")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    cases = [("", "is empty"), ("   ", "is empty"), (tmp_path / "file", "is a file, not a directory"),
             (tmp_path / "file" / "a" / "b", "which is a file"), ("/proc/self/x", "in /proc"), ("/sys/x", "in /sys"),
             ("/", "file-system root"), (model, "is the input model"), (model / "sub", "is inside the input model"),
             (tmp_path, "contains the input model")]
    for path, message in cases:
        with pytest.raises(InvalidArgument, match=message):
            outputs.check_output(path, overwrite=True, inputs=[str(model)])
    with pytest.raises(InvalidArgument, match="exists and is not empty.*--overwrite"):
        outputs.check_output(model)
    with pytest.raises(InvalidArgument, match="is not an lmshrink directory"):
        outputs.check_output(model, overwrite=True)
    assert outputs.check_output(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "model"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_check_output_refuses_a_read_only_parent(tmp_path):
    locked = tmp_path / "ro"
    locked.mkdir(mode=0o555)
    with pytest.raises(InvalidArgument, match="permission denied"):
        outputs.check_output(locked / "out")


def test_reserve_removes_the_folders_it_made_when_nothing_is_written(tmp_path):
    with outputs.reserve(tmp_path / "a" / "b" / "out") as output:
        assert outputs.lock_path(output.target).is_file()
    assert list(tmp_path.iterdir()) == []


HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from lmshrink import outputs
    with outputs.reserve(sys.argv[1], overwrite=True) as output:
        with output.staging() as staging:
            (staging / "half-written").write_text("x")
            print("holding", flush=True)
            time.sleep(120)
""")


def holder(out: Path) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert child.stdout.readline().strip() == "holding"
    return child


def test_a_second_run_fails_at_once_and_a_killed_one_blocks_nothing(tmp_path, models, weight_bytes):
    out = tmp_path / "out"
    child = holder(out)
    try:
        start = time.monotonic()
        with pytest.raises(InvalidArgument, match=r"--out: another lmshrink run is writing .*out' now"):
            lmshrink.save(models[1], out)
        assert time.monotonic() - start < 5
    finally:
        child.kill()  # SIGKILL: no cleanup runs; the lock dies with the process
        child.wait()
    assert len([p for p in tmp_path.iterdir() if p.name.endswith(".partial")]) == 1
    lmshrink.save(models[1], out)
    assert content(out, weight_bytes) == "new" and siblings(out) == []


def test_sigterm_during_save_removes_the_partial_and_ends_the_process(tmp_path):
    out = tmp_path / "out"
    child = holder(out)
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=30) == -signal.SIGTERM  # ends as SIGTERM ends a process, after the cleanup
    assert list(tmp_path.iterdir()) == []  # no partial, no lock file, no output


def test_two_cli_runs_with_the_same_out_exactly_one_succeeds(tmp_path):
    model = tmp_path / "model"
    lmshrink.save(tiny_llama(), model)
    (tmp_path / "text.txt").write_text("hello world, this is text\n" * 500)
    command = [sys.executable, "-m", "lmshrink", "compress", str(model), "--method", "svd", "--ratio", "0.5", "--data",
               str(tmp_path / "text.txt"), "--tokens", "64", "--window", "16", "--out", str(tmp_path / "out"), "--json"]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = [(run.wait(timeout=600), run.stderr.read()) for run in runs]
    assert sorted(code for code, _ in results) == [0, 2], results
    failed = next(err for code, err in results if code == 2)
    errors = [line for line in failed.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: --out: ")
    assert ("another lmshrink run is writing" in errors[0]) or ("exists and is not empty" in errors[0])
    lmshrink.load(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out", "text.txt"]


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_saved_files_follow_the_umask(tmp_path, models, mask):
    previous = os.umask(mask)
    try:
        out = lmshrink.save(models[0], tmp_path / "out")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    files = list(out.iterdir())
    assert {"model-00001-of-00001.safetensors", "model.safetensors.index.json", "lmshrink.json", "config.json"} <= {f.name for f in files}
    for file in files:
        assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~mask, file.name


def test_a_killed_train_lm_does_not_block_the_next(tmp_path, monkeypatch):
    from lmshrink.models.lstm import zoo as lstm

    monkeypatch.setenv("LMSHRINK_CACHE", str(tmp_path))
    directory = lstm.reference_dir("ptb-small")
    lock = directory.with_name(".ptb-small.training")
    lock.parent.mkdir(parents=True)
    trained = []
    monkeypatch.setattr(lstm, "_train_reference", lambda name, spec, log: trained.append(name) or directory)
    # A stale lock file from a run that was killed: the next run trains at once.
    lock.write_text("")
    assert lstm.train_reference("ptb-small") == directory and trained == ["ptb-small"]
    # A living trainer: the next run waits for it and takes its result instead of training again.
    script = ("import fcntl, sys, time, pathlib\n"
              "f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(1)\n"
              "d = pathlib.Path(sys.argv[2]); d.mkdir(parents=True); (d / 'lmshrink.json').write_text('{}')\n")
    child = subprocess.Popen([sys.executable, "-c", script, str(lock), str(directory)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    messages = []
    assert lstm.train_reference("ptb-small", log=messages.append) == directory
    assert child.wait() == 0 and trained == ["ptb-small"] and "waiting" in messages[0]
    # A trainer that is SIGKILLed leaves nothing that blocks: the next run trains.
    shutil.rmtree(directory)
    script = "import fcntl, sys, time\nf = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)\n"
    child = subprocess.Popen([sys.executable, "-c", script, str(lock)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    child.kill()
    child.wait()
    start = time.monotonic()
    assert lstm.train_reference("ptb-small") == directory and trained == ["ptb-small", "ptb-small"]
    assert time.monotonic() - start < 5


def test_a_signal_during_the_cleanup_of_a_failed_write_waits_for_the_cleanup(tmp_path, monkeypatch):
    """torchrun's SIGTERM often lands while an error unwinds: it must not stop the partial folder's removal halfway."""
    real_rmtree = shutil.rmtree

    def signalled_rmtree(path, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # handled at the next bytecode: before the real removal starts
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(outputs.shutil, "rmtree", signalled_rmtree)
    with pytest.raises(KeyboardInterrupt):
        with outputs.reserve(tmp_path / "out") as output, output.staging() as staging:
            (staging / "half.bin").write_bytes(b"0" * 1024)
            raise RuntimeError("a worker was lost")
    assert list(tmp_path.iterdir()) == []  # no partial folder, no lock file


def _scratch_child(parent: Path, end: str) -> subprocess.Popen:
    """A process that makes a scratch folder in ``parent``, prints its path, then either waits ('wait') or
    kills itself with SIGKILL ('kill'), which runs no cleanup."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        from lmshrink.outputs import scratch_directory
        with scratch_directory("lmshrink-scratch-", sys.argv[1]) as folder:
            (folder / "activations.bin").write_bytes(b"0" * 4096)
            print(folder, flush=True)
            if {end!r} == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            sys.stdin.readline()
    """)
    return subprocess.Popen([sys.executable, "-c", script, str(parent)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)


def test_a_scratch_folder_left_by_a_killed_process_is_removed_by_the_next(tmp_path):
    """A SIGKILLed worker (OOM killer, torchrun) cannot clean up: the next scratch folder made there removes its
    leftovers, and leaves alone those of living processes, other prefixes and one still being made."""
    dead = _scratch_child(tmp_path, "kill")
    dead_folder = Path(dead.stdout.readline().strip())
    assert dead.wait() == -signal.SIGKILL and (dead_folder / "activations.bin").is_file()
    living = _scratch_child(tmp_path, "wait")
    living_folder = Path(living.stdout.readline().strip())
    being_made = tmp_path / "lmshrink-scratch-beingmade"  # mkdtemp done, lock file not yet: too young to judge
    being_made.mkdir()
    other = tmp_path / "lmshrink-blocks-x"
    other.mkdir()
    try:
        with outputs.scratch_directory("lmshrink-scratch-", tmp_path) as mine:
            assert mine.is_dir() and (mine / outputs.SCRATCH_LOCK).is_file()
            assert not dead_folder.exists()
            assert living_folder.is_dir() and being_made.is_dir() and other.is_dir()
        assert not mine.exists()
    finally:
        living.communicate("\n")
    assert living.returncode == 0 and not living_folder.exists()
    # An unlocked folder without a lock file is judged dead once it is old.
    old = time.time() - 2 * 3600
    os.utime(being_made, (old, old))
    assert outputs.remove_dead_scratch(tmp_path, "lmshrink-scratch-") == [being_made]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lmshrink-blocks-x"]


def test_sigterm_removes_the_scratch_folder_and_ends_the_process(tmp_path):
    child = _scratch_child(tmp_path, "wait")
    folder = Path(child.stdout.readline().strip())
    assert folder.is_dir()
    child.terminate()
    assert child.wait(timeout=30) == -signal.SIGTERM
    assert list(tmp_path.iterdir()) == []
