"""Reading files of a model directory that may be hostile: only regular files inside the directory, bounded in size.

Every file a manifest or config names goes through ``resolve_inside`` (no absolute paths, no ``..``, no symlink
leading out, a regular file: a FIFO would hang the reader, a link to /dev/zero would fill memory). Small JSON files
are read with ``read_json_object`` (size cap, UTF-8, a JSON object), safetensors headers with ``safetensors_header``
(the header only, no tensor data). Every failure is one line (CorruptFile) naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from lmshrink.errors import CorruptFile, LmshrinkError, OutOfMemory

# A manifest, config or tokenizer config is a few kB to a few MB; anything far larger is not one.
JSON_LIMIT = 64 * 2 ** 20


def one_line(text: object) -> str:
    """The first non-empty line of an error text (third-party messages may span many lines)."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else type(text).__name__


def resolve_inside(directory: str | Path, name: object, what: str = "file", links_out: bool = False) -> Path:
    """The path of ``name`` (as a manifest or config gives it) inside ``directory``, refused unless it is a relative
    path without ``..`` whose real location (symlinks followed) is a regular file inside the directory.

    ``links_out``: a symlink in the directory may lead anywhere, as long as it ends at a regular file (a Hugging Face
    cache snapshot links each of its files into ../../blobs); the name itself must still lie inside."""
    directory = Path(directory)
    if not isinstance(name, str) or not name or "\x00" in name:
        raise CorruptFile(f"MODEL: {str(directory)!r} names its {what} as {name!r}; allowed: a file name inside the directory")
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if os.path.isabs(name) or name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
        raise CorruptFile(f"MODEL: {str(directory)!r} names its {what} as {name!r}, which is outside the directory; "
                          "allowed: a relative path inside the directory, without '..'")
    root = directory.resolve()
    path = (root / name).resolve()
    if path != root and root not in path.parents and not links_out:
        raise CorruptFile(f"MODEL: {what} {name!r} in {str(directory)!r} is a link leading outside the directory "
                          f"(to {str(path)!r}); allowed: regular files inside the directory")
    check_regular(path, what, shown=directory / name)
    return path


def check_regular(path: Path, what: str = "file", shown: Path | None = None) -> os.stat_result:
    """The stat of ``path`` (symlinks followed), refused unless it is a regular file."""
    shown = path if shown is None else shown
    try:
        info = os.stat(path)
    except OSError as error:
        raise CorruptFile(f"MODEL: {what} {str(shown)!r} cannot be read ({error.strerror or error})") from error
    if not stat.S_ISREG(info.st_mode):
        raise CorruptFile(f"MODEL: {what} {str(shown)!r} is not a regular file ({_kind(info.st_mode)}); allowed: a regular file")
    return info


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a plain file"


def check_directory_files(directory: str | Path, links_out: bool = False) -> None:
    """Refuse a model directory any of whose top-level files is not a regular file inside it: loaders (transformers
    included) open files there by name, and a FIFO, a device or a link leading out must never be one of them."""
    directory = Path(directory)
    try:
        entries = list(os.scandir(directory))
    except OSError as error:
        raise CorruptFile(f"MODEL: {str(directory)!r} cannot be listed ({error.strerror or error})") from error
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            continue
        resolve_inside(directory, entry.name, "file", links_out)


def read_bounded(path: Path, what: str, limit: int = JSON_LIMIT) -> bytes:
    """The bytes of a regular file, refused beyond ``limit``. Opened non-blocking and checked on the open descriptor,
    so a FIFO swapped in after a check can neither hang nor feed endless data."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as error:
        raise CorruptFile(f"MODEL: {what} {str(path)!r} cannot be read ({error.strerror or error})") from error
    with os.fdopen(descriptor, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise CorruptFile(f"MODEL: {what} {str(path)!r} is not a regular file ({_kind(info.st_mode)}); allowed: a regular file")
        if info.st_size > limit:
            raise CorruptFile(f"MODEL: {what} {str(path)!r} is {info.st_size:,} bytes; allowed: at most {limit:,}")
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise CorruptFile(f"MODEL: {what} {str(path)!r} is over {limit:,} bytes; allowed: at most {limit:,}")
    return data


def read_json_object(path: Path, what: str) -> dict:
    """A small JSON file that must hold one object (a manifest, config.json, tokenizer_config.json)."""
    data = read_bounded(path, what)
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise CorruptFile(f"MODEL: {what} {str(path)!r} is not UTF-8 text ({error.reason} at byte {error.start})") from error
    except (ValueError, RecursionError) as error:  # JSONDecodeError, over-long integers, absurd nesting
        raise CorruptFile(f"MODEL: {what} {str(path)!r} is not valid JSON ({one_line(error)})") from error
    if not isinstance(value, dict):
        raise CorruptFile(f"MODEL: {what} {str(path)!r} holds a JSON {type(value).__name__}; allowed: a JSON object")
    return value


def file_digest(path: Path) -> dict:
    """{"sha256": hex, "size": bytes} of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
            size += len(chunk)
    return {"sha256": digest.hexdigest(), "size": size}


@dataclass(frozen=True)
class StoredTensor:
    """What a safetensors header says of one tensor: no data read."""

    dtype: str  # torch dtype name, e.g. "float32"
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is the process running out of memory (an allocation or a mapping refused), not a damaged file."""
    text = str(error)
    return (isinstance(error, MemoryError) or "Cannot allocate memory" in text or "not enough memory" in text
            or "unable to mmap" in text)


def refuse_unreadable(error: BaseException, what: str, path: Path) -> LmshrinkError:
    """The error to raise for a file that could not be read: OutOfMemory when memory ran out, else CorruptFile."""
    if out_of_memory(error):
        return OutOfMemory(f"MODEL: {what} {str(path)!r} does not fit in this process's memory ({one_line(error)}); allowed: "
                           "more memory, or `lmshrink compress --sequential`, which holds one decoder block at a time")
    return CorruptFile(f"MODEL: {what} {str(path)!r} is truncated or corrupted ({one_line(error)})")


def safetensors_header(path: Path, what: str = "weights file") -> dict[str, StoredTensor]:
    """Name -> StoredTensor of a safetensors file, from its header alone (safetensors validates the header against
    the file's length; a truncated or inconsistent file is refused here, naming it)."""
    from safetensors import safe_open

    check_regular(path, what)
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = {}
            for name in handle.keys():
                view = handle.get_slice(name)
                header[name] = StoredTensor(_TORCH_DTYPES.get(view.get_dtype(), view.get_dtype()), tuple(view.get_shape()))
    except Exception as error:  # noqa: BLE001 - the Rust parser raises its own types for every malformed header
        raise refuse_unreadable(error, what, path) from error
    return header


# safetensors dtype codes -> torch dtype names (str(torch.float32) is "torch.float32").
_TORCH_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
                 "I16": "int16", "I8": "int8", "U8": "uint8", "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool",
                 "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def same_dtype_kind(stored: str, expected: str) -> bool:
    """Whether a stored dtype may fill a parameter of another: float <-> float is a cast (a model kept in bfloat16
    loads as float32); any other change (an int32 tensor into a float parameter) is refused, never cast."""
    def floating(name: str) -> bool:
        import torch

        dtype = getattr(torch, name, None)
        return isinstance(dtype, torch.dtype) and dtype.is_floating_point

    return stored == expected or floating(stored) and floating(expected)


def check_finite(tensor, name: str, source: object) -> None:
    """Refuse a floating tensor holding NaN or infinity (a model of such weights computes nothing meaningful)."""
    import torch

    if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise CorruptFile(f"MODEL: tensor {name!r} in {str(source)!r} holds {bad:,} non-finite values (NaN or inf); "
                          "allowed: finite weights")
