"""Output directories: checked before any work, locked while a run owns them, replaced atomically.

A run that writes a directory ``DIR`` (``compress --out``, ``import-lm --out``, ``train-lm``'s cache entry):

1. ``check_output`` refuses a bad location at once: empty, under a regular file, in /proc, /sys or /dev,
   a parent that cannot be written, inside (or containing) the input model, or an existing non-empty
   directory without ``overwrite`` (and with it, one that lmshrink did not write).
2. ``reserve`` takes an fcntl lock on ``PARENT/.DIR.lock`` for the whole run, so a second run with the same
   output fails at once; the lock dies with its process, so a killed run never blocks the next one. Holding
   the lock, it cleans what an earlier, dead run of lmshrink left beside ``DIR``: ``.DIR.<random>.partial``
   staging directories and ``.DIR.old`` (which is moved back to ``DIR`` if an interrupted swap left ``DIR``
   missing).
3. ``Output.staging`` gives a fresh ``.DIR.<random>.partial`` to write into; when the writer is done, the
   files get the permissions the user's umask gives any other writer and the staging directory replaces
   ``DIR`` by an atomic exchange (Linux renameat2 RENAME_EXCHANGE), so ``DIR`` is never missing; the old copy
   is removed afterwards. Where the exchange is not available, ``DIR`` is moved to ``.DIR.old`` first and
   moved back if the second rename fails; a crash between the two is repaired by step 2 of the next run.
   SIGTERM is handled like SIGINT while staging: the partial directory is removed, then the signal proceeds.
   A signal that lands while that removal (or the swap) runs waits for it to finish.

Scratch folders (``scratch_directory``: a distributed worker's activations, the block engine's output before it is
measured) live in the system's temporary folder and hold an fcntl lock while their process lives: a process killed
by SIGKILL (the OOM killer, torchrun tearing a job down) runs no cleanup, so the next scratch_directory call with the
same prefix removes every folder whose lock nobody holds.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import glob
import os
import re
import shutil
import signal
import stat
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from lmshrink.errors import InvalidArgument

MANIFEST = "lmshrink.json"  # what marks a directory as lmshrink's own (the same name lmshrink.io writes)
VIRTUAL_ROOTS = (Path("/proc"), Path("/sys"), Path("/dev"))
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100
SCRATCH_LOCK = ".owner.lock"  # inside a scratch folder; locked by the process that uses the folder
_UNLOCKED_GRACE_S = 3600  # a scratch folder without its lock file is one being made, unless older than this


# Outputs this process holds, so that save() inside a command that reserved its --out reuses the reservation
# (a second flock on the same file from this process would conflict with the first).
_HELD: dict[Path, "Output"] = {}


def check_output(path: str | os.PathLike | None, *, overwrite: bool = False, inputs=(), argument: str = "--out") -> Path:
    """The absolute output directory for ``path``, or InvalidArgument naming ``argument`` if it cannot be one."""
    text = "" if path is None else os.fspath(path)
    if not str(text).strip():
        raise InvalidArgument(argument, "is empty", "a directory path, e.g. compressed/my-model")
    shown = repr(str(text))
    try:
        target = Path(text).expanduser().resolve()
    except (OSError, RuntimeError, ValueError) as error:  # a symlink loop, a NUL byte, an unknown ~user
        raise InvalidArgument(argument, f"{shown} is not a usable path ({error})", "a directory path, e.g. compressed/my-model") from None
    if target.parent == target:
        raise InvalidArgument(argument, f"{shown} is a file-system root", "a directory below a writable folder")
    for root in VIRTUAL_ROOTS:
        if target == root or root in target.parents:
            raise InvalidArgument(argument, f"{shown} is in {root}, a virtual file system", "a directory on a real disk")
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        what = "is" if existing == target else f"is under {str(existing)!r}, which is"
        raise InvalidArgument(argument, f"{shown} {what} a file, not a directory", "a new directory, or one lmshrink saved before")
    writable = target.parent if existing == target else existing
    if not os.access(writable, os.W_OK | os.X_OK):
        raise InvalidArgument(argument, f"cannot write in {str(writable)!r} (permission denied)", "a directory in a folder you can write")
    for given in inputs:
        if given is None or not Path(str(given)).expanduser().exists():
            continue
        source = Path(str(given)).expanduser().resolve()
        if target == source or source in target.parents:
            where = "is" if target == source else "is inside"
            raise InvalidArgument(argument, f"{shown} {where} the input model {str(source)!r}",
                                  "a directory outside the model being read")
        if target in source.parents:
            raise InvalidArgument(argument, f"{shown} contains the input model {str(source)!r}",
                                  "a directory outside the model being read")
    try:
        filled = existing == target and any(target.iterdir())
    except OSError as error:
        raise InvalidArgument(argument, f"{shown} cannot be read ({error.strerror})", "a directory you can read and write") from None
    if filled:
        if not overwrite:
            raise InvalidArgument(argument, f"{shown} exists and is not empty", "a new or empty directory, or --overwrite")
        if not (target / MANIFEST).is_file():
            raise InvalidArgument(argument, f"{shown} is not an lmshrink directory; refusing to overwrite it",
                                  "a new or empty directory, or one lmshrink saved before")
    return target


@dataclass
class Output:
    """A reserved output directory (see ``reserve``); ``staging()`` writes it."""

    target: Path
    argument: str
    lock_fd: int
    depth: int = 1
    written: bool = False
    created: list[Path] = field(default_factory=list)

    @property
    def old(self) -> Path:
        return self.target.with_name(f".{self.target.name}.old")

    def release(self) -> None:
        """Unlock (and remove the lock file and the parent folders this reservation made, if nothing was written)."""
        if self.lock_fd < 0:
            return
        _HELD.pop(self.target, None)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path(self.target))
        os.close(self.lock_fd)
        self.lock_fd = -1
        if not self.written:
            _remove_empty(self.created)

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh directory to fill; on normal exit it replaces ``target`` atomically, on any error it is removed."""
        with _signals_as_interrupts(before_terminating=self.release) as guard:
            staging = None
            try:
                with guard.deferred():  # so the folder is never made without its name being kept for the cleanup
                    staging = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.", suffix=".partial", dir=self.target.parent))
                yield staging
                apply_umask(staging)
                with guard.deferred():  # an interrupt waits until the swap has finished
                    self._swap(staging)
            except BaseException:
                # A signal during the cleanup waits for it: torchrun's SIGTERM often lands while an error unwinds.
                with guard.deferred():
                    if staging is not None:
                        shutil.rmtree(staging, ignore_errors=True)
                raise
        self.written = True

    def _swap(self, staging: Path) -> None:
        target = self.target
        if not os.path.lexists(target):
            os.rename(staging, target)
            return
        if _exchange(staging, target):
            shutil.rmtree(staging, ignore_errors=True)  # it now holds the old copy
            return
        # No exchange rename here: move the old copy aside, the new one in, and the old one back on failure.
        os.rename(target, self.old)
        try:
            os.rename(staging, target)
        except BaseException:
            os.rename(self.old, target)
            raise
        shutil.rmtree(self.old, ignore_errors=True)


@contextlib.contextmanager
def reserve(path: str | os.PathLike | None, *, overwrite: bool = False, inputs=(), argument: str = "--out") -> Iterator[Output]:
    """Check ``path`` as an output (``check_output``), lock it for this run, and clean what dead runs left beside it.

    Nested reservations of the same directory in one process share the first one.
    """
    target = check_output(path, overwrite=overwrite, inputs=inputs, argument=argument)
    held = _HELD.get(target)
    if held is not None:
        held.depth += 1
        try:
            yield held
        finally:
            held.depth -= 1
        return
    created = _make_parents(target.parent, argument)
    try:
        lock_fd = _lock(target, argument)
    except BaseException:
        _remove_empty(created)
        raise
    output = _HELD[target] = Output(target, argument, lock_fd, created=created)
    try:
        _clean_siblings(output)
        check_output(path, overwrite=overwrite, inputs=inputs, argument=argument)  # the cleaning may have restored DIR
        yield output
    finally:
        output.release()


def lock_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.lock")


def _lock(target: Path, argument: str) -> int:
    path = lock_path(target)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InvalidArgument(argument, f"another lmshrink run is writing {str(target)!r} now (lock {str(path)!r})",
                                  "a different output directory, or wait until that run ends") from None
        except BaseException:
            os.close(fd)
            raise
        # The holder before us unlinks the file before unlocking it: make sure we locked the file still there.
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def stale_siblings(target: Path) -> list[Path]:
    """Staging directories (``.NAME.<8 random>.partial``) and ``.NAME.old`` that lmshrink made beside ``target``."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.[a-z0-9_]{{8}}\.partial")
    found = [p for p in target.parent.iterdir() if pattern.fullmatch(p.name)] if target.parent.is_dir() else []
    old = target.with_name(f".{target.name}.old")
    return found + ([old] if os.path.lexists(old) else [])


def _clean_siblings(output: Output) -> None:
    # Called holding the lock: any sibling of ours is from a run that died (a living one would hold the lock).
    for sibling in stale_siblings(output.target):
        if sibling == output.old and not os.path.lexists(output.target) and (sibling / MANIFEST).is_file():
            os.rename(sibling, output.target)  # a swap was interrupted between its two renames: the old copy is whole
        elif sibling.is_dir() and not sibling.is_symlink():
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            sibling.unlink(missing_ok=True)


@contextlib.contextmanager
def scratch_directory(prefix: str, parent: str | os.PathLike | None = None) -> Iterator[Path]:
    """A new private folder ``PARENT/PREFIX<random>`` (PARENT: the system's temporary folder) for this process,
    removed on exit, on SIGINT and on SIGTERM. Folders with the same prefix left by dead processes (see the module
    docstring) are removed first."""
    parent = Path(tempfile.gettempdir() if parent is None else parent)
    remove_dead_scratch(parent, prefix)
    with _signals_as_interrupts() as guard:
        folder, lock_fd = None, -1
        try:
            with guard.deferred():  # the folder and its lock appear together, or neither does
                folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
                lock_fd = _locked_file(folder / SCRATCH_LOCK)
            yield folder
        finally:
            with guard.deferred():
                if folder is not None:
                    shutil.rmtree(folder, ignore_errors=True)
                if lock_fd >= 0:
                    os.close(lock_fd)


def remove_dead_scratch(parent: Path, prefix: str) -> list[Path]:
    """Remove the scratch folders ``PARENT/PREFIX*`` of this user whose lock no living process holds; return them."""
    removed = []
    for folder in parent.glob(glob.escape(prefix) + "*") if parent.is_dir() else []:
        try:
            info = folder.lstat()
        except FileNotFoundError:
            continue
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            continue
        try:
            fd = os.open(folder / SCRATCH_LOCK, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:  # killed between mkdtemp and the lock (or being made right now: wait a while)
            if time.time() - info.st_mtime > _UNLOCKED_GRACE_S:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # its process is alive
        else:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        finally:
            os.close(fd)
    return removed


def _locked_file(path: Path) -> int:
    """Create ``path`` already locked: made under another name, locked, then renamed, so no other process ever
    finds it unlocked while its owner lives."""
    making = path.with_name(path.name + ".new")
    fd = os.open(making, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(making, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _make_parents(parent: Path, argument: str) -> list[Path]:
    missing = []
    folder = parent
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        except OSError as error:
            _remove_empty(missing[missing.index(folder) + 1:])
            raise InvalidArgument(argument, f"cannot create {str(folder)!r}: {error.strerror}",
                                  "a directory in a folder you can write") from None
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        with contextlib.suppress(OSError):
            folder.rmdir()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the OS or file system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def current_umask() -> int:
    try:  # Linux >= 4.7 reports it without changing it (os.umask would, for every thread, for a moment)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(directory: Path) -> None:
    """Give ``directory`` and everything in it the permissions a plain writer gets under the current umask.

    mkdtemp makes 0700 directories and some writers make 0600 files; a saved model should be as readable as
    any other file the user writes.
    """
    mask = current_umask()
    os.chmod(directory, 0o777 & ~mask)
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


class _Interrupted(KeyboardInterrupt):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Guard:
    def __init__(self):
        self.deferring, self.pending = False, None

    def handle(self, signum, frame):
        if self.deferring:
            self.pending = signum
            return
        raise _Interrupted(signum)

    @contextlib.contextmanager
    def deferred(self):
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
        pending, self.pending = self.pending, None
        if pending is not None:
            raise _Interrupted(pending)


@contextlib.contextmanager
def _signals_as_interrupts(before_terminating=lambda: None) -> Iterator[_Guard]:
    """SIGINT and SIGTERM raise an interrupt (so cleanup runs); after it, a SIGTERM proceeds as it would have
    (``before_terminating`` runs first: the default action ends the process without unwinding further)."""
    guard = _Guard()
    if threading.current_thread() is not threading.main_thread():
        yield guard  # only the main thread may set handlers; others get the default behaviour
        return
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(signum)
        if handler is not signal.SIG_IGN and handler is not None:
            previous[signum] = signal.signal(signum, guard.handle)
    try:
        yield guard
    except _Interrupted as interrupt:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        previous = {}
        if interrupt.signum == signal.SIGTERM:
            before_terminating()
            signal.raise_signal(signal.SIGTERM)  # default: the process ends with the usual status
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def nonfinite_tensors(model) -> list[str]:
    """Names of the floating-point parameters and buffers of ``model`` that hold NaN or inf."""
    import torch

    return [name for name, tensor in model.state_dict(keep_vars=False).items()
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
