"""Checkpoint tensors read one at a time, the sharded safetensors writer, and filling meta-device skeletons.

A *tensor source* (``SafetensorsSource``, ``GGUFSource``) lists a checkpoint's tensors (names, shapes,
dtypes) from headers alone and reads one tensor on request, so a model never has to fit in memory.
``ShardWriter`` writes what a block-by-block pass produces in the Hugging Face layout
(``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``). ``materialize`` / ``release``
move a module between the meta device and real memory, keeping tied parameters tied; ``fill`` copies a
module's state from a source, tensor by tensor, strictly (every entry filled, nothing extra).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lmshrink.errors import CorruptFile

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors header dtype names (https://github.com/huggingface/safetensors, format spec)
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    begin: int  # absolute byte offsets in the file
    end: int


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Every tensor's shape, dtype and byte range in one safetensors file; checks the file holds them all."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CorruptFile(f"MODEL: shard {path.name!r} is truncated: {size} bytes, shorter than a safetensors header")
            length = int.from_bytes(prefix, "little")
            if length > size - 8:
                raise CorruptFile(f"MODEL: shard {path.name!r} is truncated: its header claims {length:,} bytes, the file has {size:,}")
            header = json.loads(handle.read(length))
    except OSError as error:
        raise CorruptFile(f"MODEL: shard {path.name!r} cannot be read: {error}") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CorruptFile(f"MODEL: shard {path.name!r} has a corrupted header ({error})") from error
    header.pop("__metadata__", None)
    start = 8 + length
    tensors = {}
    for name, entry in header.items():
        try:
            dtype = _DTYPES[entry["dtype"]]
            begin, end = (int(v) for v in entry["data_offsets"])
            shape = tuple(int(v) for v in entry["shape"])
        except (KeyError, TypeError, ValueError) as error:
            raise CorruptFile(f"MODEL: shard {path.name!r} describes tensor {name!r} in a way this reader does not know ({error})") from error
        tensors[name] = TensorInfo(shape, dtype, path, start + begin, start + end)
    needed = max((info.end for info in tensors.values()), default=start)
    if needed > size:
        raise CorruptFile(f"MODEL: shard {path.name!r} is truncated: its header describes {needed:,} bytes, the file has {size:,}")
    return tensors


def read_tensor(info: TensorInfo, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """One tensor's bytes read from its file (the file is never mapped). Into ``out`` when given: in place when it is a
    contiguous CPU tensor of the stored dtype and shape (no second copy of a large table), else cast and copied."""
    direct = (out is not None and out.device.type == "cpu" and out.dtype == info.dtype and out.is_contiguous()
              and tuple(out.shape) == tuple(info.shape) and out.numel() > 0
              and sys.byteorder == "little")  # safetensors stores little-endian
    buffer = out.detach().view(-1).view(torch.uint8).numpy() if direct else bytearray(info.end - info.begin)
    with open(info.file, "rb") as handle:
        handle.seek(info.begin)
        if handle.readinto(buffer) != len(buffer):
            raise CorruptFile(f"MODEL: shard {info.file.name!r} is truncated (tensor {name!r} is cut short)")
    if direct:
        return out
    tensor = torch.frombuffer(buffer, dtype=info.dtype).reshape(info.shape) if buffer else torch.empty(info.shape, dtype=info.dtype)
    if out is None:
        return tensor
    with torch.no_grad():  # out may be a parameter
        return out.copy_(tensor)


class SafetensorsSource:
    """A Hugging Face checkpoint directory: ``model.safetensors``, or shards listed in ``model.safetensors.index.json``.

    Headers are read (and every shard checked to exist and be complete) at construction; tensor data only by ``get``.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        self.tensors: dict[str, TensorInfo] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
                raise CorruptFile(f"MODEL: {str(index)!r} is not a readable safetensors index ({error})") from error
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (self.directory / s).is_file()]
            if missing:
                raise CorruptFile(f"MODEL: shard {missing[0]!r} named in {INDEX_FILE} is missing from {str(self.directory)!r}"
                                  + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
            headers = {s: read_safetensors_header(self.directory / s) for s in shards}
            absent = [(name, shard) for name, shard in weight_map.items() if name not in headers[shard]]
            if absent:
                name, shard = absent[0]
                raise CorruptFile(f"MODEL: {INDEX_FILE} names tensor {name!r} in shard {shard!r}, which does not hold it"
                                  + (f" ({len(absent)} such tensors)" if len(absent) > 1 else ""))
            self.tensors = {name: headers[shard][name] for name, shard in weight_map.items()}
        elif (self.directory / SINGLE_FILE).is_file():
            self.tensors = read_safetensors_header(self.directory / SINGLE_FILE)
        else:
            raise CorruptFile(f"MODEL: {str(self.directory)!r} holds neither {SINGLE_FILE} nor {INDEX_FILE}")

    @property
    def folder(self) -> Path:
        return self.directory

    pretrained_kwargs: dict = {}

    def names(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return self.tensors[name].dtype

    def declared_dtype(self) -> torch.dtype:
        """The checkpoint's floating dtype: config.json's dtype, else that of its first floating tensor."""
        try:
            config = json.loads((self.directory / "config.json").read_text())
        except (OSError, json.JSONDecodeError):
            config = {}
        declared = config.get("dtype") or config.get("torch_dtype")
        if isinstance(declared, str) and isinstance(getattr(torch, declared, None), torch.dtype):
            return getattr(torch, declared)
        return next((i.dtype for i in self.tensors.values() if i.dtype.is_floating_point), torch.float32)

    def get(self, name: str, dtype: torch.dtype | None = None, device=None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor ``name`` (cast to ``dtype``, on ``device``), or written into ``out`` and ``out`` returned."""
        tensor = read_tensor(self.tensors[name], name, out)
        return tensor if out is not None else tensor.to(device=device, dtype=dtype or tensor.dtype)


class GGUFSource:
    """A .gguf file's tensors, dequantized one at a time, under their Hugging Face names and layouts.

    Name mapping and per-architecture fixes (LLaMA's q/k un-permutation, Gemma's norm offset) are transformers'
    own (modeling_gguf_pytorch_utils), so each tensor equals what ``from_pretrained(gguf_file=...)`` loads.
    """

    def __init__(self, path: str | Path):
        from gguf import GGUFReader
        from transformers import AutoConfig
        from transformers import modeling_gguf_pytorch_utils as hf_gguf

        from lmshrink.models.blocks import build_skeleton

        self.path = Path(path)
        try:
            self._reader = GGUFReader(str(self.path))
            self.config = AutoConfig.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
        except (OSError, ValueError, KeyError) as error:
            raise CorruptFile(f"MODEL: {str(self.path)!r} is not a GGUF file transformers can read: {str(error).splitlines()[0]}") from error
        architecture = hf_gguf.read_field(self._reader, "general.architecture")[0]
        # The processors read Hugging Face config names (num_attention_heads, ...), which the parsed config has.
        self._processor = hf_gguf.TENSOR_PROCESSORS.get(architecture, hf_gguf.TensorProcessor)(config=self.config.to_dict())
        skeleton = build_skeleton(self.config, torch.float32)
        self._mapping = hf_gguf.get_gguf_hf_weights_map(skeleton, self._processor)
        shapes = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
        self._by_name = {}
        self._shapes = {}
        for tensor in self._reader.tensors:
            hf_name = self._mapping.get(tensor.name)
            if hf_name is not None:
                self._by_name[hf_name] = tensor
                self._shapes[hf_name] = shapes[hf_name]

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def pretrained_kwargs(self) -> dict:
        return {"gguf_file": self.path.name}

    def names(self) -> list[str]:
        return list(self._by_name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> torch.dtype:
        return torch.float32  # dequantized

    def declared_dtype(self) -> torch.dtype:
        return torch.bfloat16  # quantized weights have no float dtype of their own; bf16 holds them with float32's range

    def get(self, name: str, dtype: torch.dtype | None = None, device=None, out: torch.Tensor | None = None) -> torch.Tensor:
        import numpy as np
        from gguf import dequantize

        tensor = self._by_name[name]
        weights = dequantize(tensor.data, tensor.tensor_type)
        result = self._processor.process(weights=weights, name=tensor.name, tensor_key_mapping=self._mapping,
                                         parsed_parameters={"config": self.config.to_dict(), "tensors": {}})
        array = result.weights if result.weights.flags.writeable else np.array(result.weights)  # unquantized: a view of the file
        tensor = torch.from_numpy(np.ascontiguousarray(array)).reshape(self._shapes[name])
        if out is None:
            return tensor.to(device=device, dtype=dtype or torch.float32)
        with torch.no_grad():
            return out.copy_(tensor)


def open_source(path: str | Path):
    """The tensor source of a checkpoint: a .gguf file, or a directory of safetensors."""
    path = Path(path).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return GGUFSource(path)
    if path.is_dir():
        return SafetensorsSource(path)
    raise CorruptFile(f"MODEL: {str(path)!r} is neither a .gguf file nor a directory of safetensors shards")


class ShardWriter:
    """Writes tensors as Hugging Face sharded safetensors: one shard per ``end_shard()`` call (or per size limit).

    Shards are written under temporary names and renamed to ``model-0000i-of-0000N.safetensors`` by ``close``,
    which also writes ``model.safetensors.index.json``; N is known only then. Floating tensors are cast to
    ``dtype`` when one is given; tensors that share storage (tied weights) are written once, under their first name.
    """

    def __init__(self, directory: str | Path, dtype: torch.dtype | None = None, max_shard_bytes: int | None = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.dtype, self.max_shard_bytes = dtype, max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []
        self._names: set[str] = set()
        self.total_size = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        seen = {}
        for name, tensor in tensors.items():
            if name in self._names or name in self._pending:
                raise ValueError(f"tensor {name!r} was already written")
            key = (tensor.data_ptr(), tensor.shape, tensor.dtype, tensor.device) if tensor.numel() else None
            if key is not None and key in seen:
                continue  # tied: the loader fills every alias from the first name
            seen[key] = name
            tensor = tensor.detach()
            if self.dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(self.dtype)
            tensor = tensor.to("cpu").contiguous()
            self._pending[name] = tensor
            self._pending_bytes += tensor.numel() * tensor.element_size()
            if self.max_shard_bytes is not None and self._pending_bytes >= self.max_shard_bytes:
                self.end_shard()

    def end_shard(self) -> None:
        from safetensors.torch import save_file

        if not self._pending:
            return
        path = self.directory / f".shard-{len(self._written) + 1:05d}.partial"
        # A tensor of the block may be a view of a larger one; clone so safetensors writes only its own bytes.
        save_file({n: t.clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size() else t
                   for n, t in self._pending.items()}, str(path), metadata={"format": "pt"})
        self._written.append((path, list(self._pending)))
        self._names.update(self._pending)
        self.total_size += self._pending_bytes
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[Path]:
        """Rename the shards to their final names and write the index; returns the shard paths."""
        self.end_shard()
        count = len(self._written)
        weight_map, paths = {}, []
        for number, (temporary, names) in enumerate(self._written, start=1):
            final = self.directory / f"model-{number:05d}-of-{count:05d}.safetensors"
            os.replace(temporary, final)
            paths.append(final)
            weight_map.update({name: final.name for name in names})
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return paths


def materialize(module: nn.Module, device, recurse: bool = True, made: dict | None = None) -> None:
    """Give every meta parameter/buffer of ``module`` real (uninitialized) memory on ``device``; tied stay tied.

    Real buffers (e.g. rotary frequencies computed at construction) are moved, not wiped, which is what
    ``nn.Module.to_empty`` would do. Calls on several modules that share tensors pass one ``made`` dict.
    """
    made = {} if made is None else made
    for sub in module.modules() if recurse else [module]:
        for name, param in list(sub._parameters.items()):
            if param is None:
                continue
            if id(param) not in made:
                data = torch.empty(param.shape, dtype=param.dtype, device=device) if param.is_meta else param.data.to(device)
                made[id(param)] = nn.Parameter(data, requires_grad=param.requires_grad)
            sub._parameters[name] = made[id(param)]
        for name, buffer in list(sub._buffers.items()):
            if buffer is None:
                continue
            if id(buffer) not in made:
                made[id(buffer)] = torch.empty(buffer.shape, dtype=buffer.dtype, device=device) if buffer.is_meta else buffer.to(device)
            sub._buffers[name] = made[id(buffer)]


def release(module: nn.Module) -> None:
    """Move every parameter of ``module`` back to the meta device (frees its memory, handed back to the OS); tied stay tied."""
    made: dict[int, nn.Parameter] = {}
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is None:
                continue
            if id(param) not in made:
                made[id(param)] = nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device="meta"), requires_grad=param.requires_grad)
            sub._parameters[name] = made[id(param)]
    return_freed_memory()


def return_freed_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc's ``malloc_trim``; nothing elsewhere).

    Block by block, a block's weights, one boundary's activations and each window's intermediates are freed for the
    next ones, but glibc keeps freed chunks of a few MB in its heap, fragmented, and the heap grows beside them. On
    SmolLM2 (64 calibration windows) peak RSS 2073 MiB when trimmed after each block, 1484 MiB after each window too
    (benchmarks/results/sequential_memory_64*.md); the pages handed back are faulted in again when reused. Neither
    torch nor the standard library offers it, hence ctypes.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    import ctypes

    try:
        return ctypes.CDLL(None).malloc_trim  # the process's own symbols: glibc's on Linux
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows)
        return None


def fill(module: nn.Module, source, prefix: str = "", exclude: tuple[str, ...] = ()) -> list[str]:
    """Copy ``module``'s parameters and persistent buffers from ``source`` (names ``prefix + key``), one tensor at a time.

    Strict: every entry must be in the source (a tied group needs one of its names), and every source name
    under ``prefix`` (other than those under an ``exclude`` prefix) must be used. The module must already be
    materialized; tensors are cast to its dtypes. Returns the source names used.
    """
    groups: dict[int, list[str]] = {}
    tensors: dict[int, torch.Tensor] = {}
    for key, tensor in module.state_dict(keep_vars=True).items():
        if any((prefix + key).startswith(e) for e in exclude):
            continue
        groups.setdefault(id(tensor), []).append(key)
        tensors[id(tensor)] = tensor
    available = set(source.names())
    used, missing = [], []
    with torch.no_grad():
        for ident, keys in groups.items():
            name = next((prefix + k for k in keys if prefix + k in available), None)
            if name is None:
                missing.append(prefix + keys[0])
                continue
            target = tensors[ident]
            if target.is_meta:
                raise ValueError(f"{prefix + keys[0]} is still on the meta device; materialize the module first")
            if tuple(source.shape(name)) != tuple(target.shape):
                raise CorruptFile(f"MODEL: tensor {name!r} has shape {tuple(source.shape(name))} in the checkpoint, "
                                  f"the model expects {tuple(target.shape)}")
            source.get(name, out=target)
            used.extend(prefix + k for k in keys if prefix + k in available)
    if missing:
        raise CorruptFile(f"MODEL: the checkpoint lacks {len(missing)} tensor(s) the model needs: {missing[:5]}")
    extra = sorted(n for n in available - set(used) if n.startswith(prefix) and not any(n.startswith(e) for e in exclude))
    if extra:
        raise CorruptFile(f"MODEL: the checkpoint holds {len(extra)} tensor(s) the model does not have: {extra[:5]}")
    return used
