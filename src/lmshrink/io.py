"""Save and load compressed models in one format, that of both executors (whole-model and block-by-block).

A saved directory holds Hugging Face sharded safetensors (``model-0000i-of-0000N.safetensors`` +
``model.safetensors.index.json``, also for a small model: one shard), written by ``shards.ShardWriter`` in the
weights' own dtype with tied tensors stored once, plus ``lmshrink.json`` (the manifest, with every weights file's
sha256), config.json and the tokenizer. Written atomically (lmshrink.outputs), never pickled. ``load`` also reads
the single ``model.safetensors`` of saves made before this format.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from pathlib import Path

import torch
from torch import nn

from lmshrink.devices import dtype_name as torch_dtype_name
from lmshrink.devices import model_dtype
from lmshrink.errors import CorruptFile, InvalidArgument, NotAModel
from lmshrink.version import __version__
from lmshrink.layers import layer_type
from lmshrink.layers.base import FactorizedModule
from lmshrink.safefiles import (refuse_unreadable, StoredTensor, check_directory_files, check_finite, dtype_name, file_digest, one_line,
                                read_json_object, resolve_inside, safetensors_header, same_dtype_kind)

FORMAT_VERSION = 1
MANIFEST = "lmshrink.json"
WEIGHTS = "model.safetensors"  # the single weights file of saves made before the sharded layout (still read)
INDEX = "model.safetensors.index.json"  # the sharded layout: this index + model-0000i-of-0000N.safetensors
MAX_SHARD_BYTES = 2 << 30


def _version() -> str:
    return __version__


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("+")[0].split(".") if part.isdigit())


def manifest_of(loaded) -> dict:
    model = loaded.model
    modules, owners = {}, {}  # owners: id(parameter) -> the first factorized module holding it
    for name, m in model.named_modules():
        if not isinstance(m, FactorizedModule):
            continue
        shared = {attribute: owners[id(p)] for attribute, p in m._parameters.items() if p is not None and id(p) in owners}
        owners.update({id(p): name for p in m._parameters.values() if p is not None and id(p) not in owners})
        modules[name] = {"layer": type(m).__name__, "config": m.layer_config(),
                         **({"output_scale": m.output_scale} if m.output_scale != 1.0 else {}),
                         **({"shared": shared} if shared else {})}  # --joint: one right factor for linears of one input
    return {"format": "lmshrink", "format_version": FORMAT_VERSION, "lmshrink_version": _version(),
            "family": loaded.family.name, "source": loaded.source, "modules": modules,
            "compression": loaded.compression, **({"recipe": loaded.recipe} if loaded.recipe else {})}


def check_out(directory: str | Path, overwrite: bool = False, inputs=()) -> Path:
    """``directory`` checked as an output before any work (lmshrink.outputs.check_output)."""
    from lmshrink.outputs import check_output

    return check_output(directory, overwrite=overwrite, inputs=inputs)


@contextlib.contextmanager
def staging_directory(directory: str | Path, overwrite: bool = False, inputs=()):
    """A temporary sibling of ``directory`` to write into, swapped into place atomically when the block ends without
    error; the output is locked meanwhile (lmshrink.outputs)."""
    from lmshrink.outputs import reserve

    with reserve(directory, overwrite=overwrite, inputs=inputs) as output, output.staging() as staging:
        yield staging


def write_manifest(loaded, directory: Path, dtype: torch.dtype, run: dict | None = None) -> dict:
    """Config, tokenizer and lmshrink.json of ``loaded`` into ``directory``, whose weights (shards + index) are
    written by now: the manifest records each weights file's digest, which ``load`` verifies. ``run``: how the run
    was executed (e.g. {"processes": N, "executor": "sequential"}), recorded as the manifest's "run"."""
    config = getattr(loaded.model, "config", None)
    if config is not None:
        config.dtype = torch_dtype_name(dtype)
    manifest = manifest_of(loaded)
    if run is not None:
        manifest["run"] = run
    manifest["base"] = loaded.family.save_base(loaded, directory)
    manifest["weights"] = {"layout": "sharded-safetensors", "dtype": torch_dtype_name(dtype)}
    manifest["files"] = {path.name: file_digest(path) for path in sorted(directory.glob("model*.safetensors*"))}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def write_weights(model: nn.Module, directory: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """``model``'s persistent tensors as sharded safetensors + index, each in its own dtype, tied tensors once."""
    from lmshrink.shards import ShardWriter

    writer = ShardWriter(directory, None, max_shard_bytes)
    writer.add(model.state_dict())
    writer.close()


def save(loaded, directory: str | Path, overwrite: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES,
         run: dict | None = None) -> Path:
    """Write the model to ``directory``, in the dtype its weights are held in. Everything goes to a temporary sibling
    first, which then replaces ``directory`` atomically (lmshrink.outputs), so an interrupted save never leaves a
    directory that looks complete, nor loses the one it was replacing. Non-finite weights are refused: nothing is written.
    ``run``: how the model was made (e.g. {"processes": 2, "executor": "whole-model"}), the manifest's "run"."""
    from lmshrink.models import load_model
    from lmshrink.outputs import nonfinite_tensors, reserve

    loaded = load_model(loaded)
    bad = nonfinite_tensors(loaded.model)
    if bad:
        raise InvalidArgument("model", f"{len(bad)} tensors hold NaN or inf ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}); "
                              "nothing was saved", "a model with finite weights")
    with reserve(directory, overwrite=overwrite, inputs=[loaded.source]) as output, output.staging() as staging:
        write_weights(loaded.model, staging, max_shard_bytes)
        write_manifest(loaded, staging, model_dtype(loaded.model), run=run)
    return output.target


# Tensor names only lmshrink's factorized layers produce: a directory holding them without a manifest is a damaged
# lmshrink directory, never a Hugging Face one (which would load as a dense model with fresh random weights).
FACTOR_TENSOR = re.compile(r"(^|\.)(left|right|token_group|token_ranks|indices)$|(^|\.)(lefts|rights|cores)\.\d+$"
                           r"|(^|\.)(lefts_q|rights_q|cores_q)\.\d+\.|(^|\.)(weight_q|left_q|right_q|common_q|rare_q)\.(packed|scales|minimums)$")


def looks_like_lmshrink(directory: Path) -> bool:
    """Whether ``directory`` is (or was) an lmshrink directory: a manifest entry of any kind (even a FIFO or a broken
    link), or weights holding factorized layers' tensors (names from the shard index, or the single file's header)."""
    if os.path.lexists(directory / MANIFEST):
        return True
    try:
        if os.path.lexists(directory / INDEX):
            weight_map = read_json_object(resolve_inside(directory, INDEX, "weights index"), "weights index").get("weight_map")
            names = list(weight_map) if isinstance(weight_map, dict) else []
        elif os.path.lexists(directory / WEIGHTS):
            names = safetensors_header(resolve_inside(directory, WEIGHTS, "weights file"))
        else:
            return False
    except CorruptFile:
        return False  # unreadable weights: the Hugging Face loader reports them
    return any(FACTOR_TENSOR.search(name) for name in names)


def _bad_manifest(path: Path, problem: str) -> CorruptFile:
    return CorruptFile(f"MODEL: manifest {str(path)!r} {problem}")


def read_manifest(directory: str | Path) -> dict:
    """The manifest of a saved directory, checked for what loading relies on (types and required keys)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not os.path.lexists(path):
        raise CorruptFile(f"MODEL: {str(directory)!r} has no {MANIFEST}: not a saved lmshrink directory, or a damaged one "
                          "(without its manifest, factorized weights cannot be placed)")
    manifest = read_json_object(resolve_inside(directory, MANIFEST, "manifest"), "manifest")
    if manifest.get("format") != "lmshrink":
        raise _bad_manifest(path, "is not an lmshrink manifest (no 'format': 'lmshrink')")
    version = manifest.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        written = manifest.get("lmshrink_version", "?")
        raise CorruptFile(f"MODEL: {str(path)!r} was written by lmshrink {str(written)[:40]} (format {str(version)[:40]}); "
                          f"this lmshrink {_version()} reads format 1 to {FORMAT_VERSION}: upgrade lmshrink")
    for key, kind, what in (("family", str, "a string"), ("base", dict, "an object"), ("modules", dict, "an object")):
        if key not in manifest:
            raise _bad_manifest(path, f"lacks {key!r}")
        if not isinstance(manifest[key], kind):
            raise _bad_manifest(path, f"has {key!r} of type {type(manifest[key]).__name__}; allowed: {what}")
    for name, spec in manifest["modules"].items():
        if not name or not isinstance(spec, dict) or not isinstance(spec.get("layer"), str) or not isinstance(spec.get("config"), dict):
            raise _bad_manifest(path, f"describes module {name!r} as {str(spec)[:60]}; allowed: "
                                      "{'layer': LAYER TYPE, 'config': {...}} under a non-empty module name")
    compression = manifest.get("compression", [])
    if not isinstance(compression, list) or not all(isinstance(row, dict) for row in compression):
        raise _bad_manifest(path, "has a 'compression' report that is not a list of objects")
    files = manifest.get("files", {})
    if not isinstance(files, dict) or not all(isinstance(d, dict) and isinstance(d.get("sha256"), str) and
                                              not isinstance(d.get("size"), bool) and isinstance(d.get("size"), int)
                                              for d in files.values()):
        raise _bad_manifest(path, "has a 'files' record that is not {NAME: {'sha256': HEX, 'size': BYTES}}")
    return manifest


def verify_files(directory: Path, manifest: dict) -> None:
    """Check each file the manifest records a digest of (older manifests record none)."""
    for name, recorded in manifest.get("files", {}).items():
        path = resolve_inside(directory, name, "recorded file")
        actual = file_digest(path)
        if actual != {"sha256": recorded["sha256"], "size": recorded["size"]}:
            raise CorruptFile(f"MODEL: {str(path)!r} is truncated or corrupted: its sha256 {actual['sha256'][:16]}... ({actual['size']:,} bytes) "
                              f"differs from the one recorded at save ({str(recorded['sha256'])[:16]}..., {recorded['size']:,} bytes)")


def load(directory: str | Path, verify: bool = True, device=None, dtype=None):
    """Rebuild a saved model without the original weights, strictly.

    The model (base from its config, factorized layers from the manifest) is first built on the meta device, where
    nothing is allocated, and every parameter and buffer it would hold is checked against the safetensors headers
    (name, shape, dtype; nothing missing, nothing extra). Only then is it allocated (exactly what was checked) and
    filled; a non-finite weight is refused. ``verify`` checks the weights files' sha256 against the manifest (when
    recorded). Weights are held in the dtype they were saved in; ``device`` / ``dtype`` ("auto": the saved dtype)
    move and cast them afterwards (lmshrink.devices.place).
    """
    from lmshrink.devices import place
    from lmshrink.models import FAMILIES, _import_families

    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise NotAModel(f"MODEL: {str(directory)!r} is not a directory")
    check_directory_files(directory)
    manifest = read_manifest(directory)
    _import_families()
    family = FAMILIES.get(manifest["family"])
    if family is None:
        raise CorruptFile(f"MODEL: manifest names model family {manifest['family'][:40]!r}; known: {', '.join(FAMILIES)}")
    if verify:
        verify_files(directory, manifest)
    where, stored = _stored_tensors(directory)
    weights = directory / (INDEX if os.path.lexists(directory / INDEX) else WEIGHTS)  # named in messages
    _bound_list_lengths(directory, manifest, len(stored))
    loaded = _build(directory, manifest, family, stored)
    groups = _check_against_header(loaded.model, manifest, stored, weights)
    _bound_transient_buffers(loaded.model, stored, weights)
    family.materialize(loaded)  # allocates exactly what was checked
    _retie(loaded.model, groups)
    _fill(loaded.model, groups, where)
    saved_dtype = manifest.get("weights", {}).get("dtype") if isinstance(manifest.get("weights"), dict) else None
    if saved_dtype in ("bfloat16", "float16"):
        # Held in the dtype it was saved in (built in float32 on meta); parameters only, as a model built in that
        # dtype has them: computed buffers such as rotary frequencies stay float32.
        for parameter in loaded.model.parameters():
            parameter.data = parameter.data.to(getattr(torch, saved_dtype))
    loaded.model.eval()
    loaded.manifest, loaded.source = manifest, str(directory)
    loaded.compression = manifest.get("compression", [])
    loaded.recipe = manifest.get("recipe") if isinstance(manifest.get("recipe"), dict) else None
    return place(loaded, device, model_dtype(loaded.model) if dtype == "auto" else dtype)  # auto: as saved


def _bound_list_lengths(directory: Path, manifest: dict, tensors: int) -> None:
    # A layer has at least one stored tensor per group / core its lists describe; longer lists would only cost time.
    for name, spec in manifest["modules"].items():
        for key, value in spec["config"].items():
            if isinstance(value, list) and len(value) > tensors + 1:
                raise CorruptFile(f"MODEL: manifest {str(directory / MANIFEST)!r}: module {name!r} ({spec['layer']}) config "
                                  f"{key!r} lists {len(value):,} values for {tensors} stored tensors")


def _build(directory: Path, manifest: dict, family, stored: dict[str, StoredTensor]):
    """The model the manifest describes, on the meta device (nothing allocated)."""
    from lmshrink.layers.base import replace_module

    loaded = family.build_empty(directory, manifest["base"], stored=stored)
    for name, spec in manifest["modules"].items():
        where = f"MODEL: manifest {str(directory / MANIFEST)!r}: module {name!r} ({spec['layer'][:40]})"
        try:
            loaded.model.get_submodule(name)
        except AttributeError:
            raise CorruptFile(f"{where}: the model has no such module") from None
        layer_class = layer_type(spec["layer"])
        try:
            with torch.device("meta"):
                layer = layer_class.from_config(spec["config"], loaded.model)
            if "output_scale" in spec:
                layer.set_output_scale(_output_scale(spec["output_scale"]))
            replace_module(loaded.model, name, layer)
        except CorruptFile as error:
            raise CorruptFile(f"{where}: {error}") from error
        except (ValueError, TypeError, RuntimeError, KeyError, IndexError, AttributeError, OverflowError) as error:
            # Constructors refuse inconsistent sizes (group sizes that do not sum, TT shapes that do not multiply).
            raise CorruptFile(f"{where}: config {str(spec['config'])[:80]} does not describe a layer ({one_line(error)})") from error
    for name, spec in manifest["modules"].items():
        if "shared" in spec:
            _share(loaded.model, name, spec, manifest["modules"], f"MODEL: manifest {str(directory / MANIFEST)!r}: module {name!r}")
    return loaded


def _share(model: nn.Module, name: str, spec: dict, modules: dict, where: str) -> None:
    """Make ``name``'s parameters listed in its spec's "shared" ({attribute: owner module}) the owner's own (untrusted:
    the owner must be another factorized module of the manifest that shares nothing itself, the shapes equal)."""
    shared = spec["shared"]
    if not isinstance(shared, dict) or not shared or len(shared) > 8:
        raise CorruptFile(f"{where}: 'shared' is {str(shared)[:60]!r}; allowed: a mapping of a few parameter names to modules")
    layer = model.get_submodule(name)
    for attribute, owner in shared.items():
        if not isinstance(owner, str) or owner == name or owner not in modules or "shared" in modules[owner]:
            raise CorruptFile(f"{where}: shares {str(attribute)[:40]!r} with {str(owner)[:80]!r}; allowed: another factorized "
                              "module of the manifest that shares nothing itself")
        mine, theirs = layer._parameters.get(attribute), model.get_submodule(owner)._parameters.get(attribute)
        if not isinstance(attribute, str) or mine is None or theirs is None or mine.shape != theirs.shape:
            raise CorruptFile(f"{where}: shares {str(attribute)[:40]!r} with {owner!r}, but the two layers have no such "
                              "parameter of one shape")
        layer._parameters[attribute] = theirs


def _output_scale(value) -> float:
    """A manifest's ``output_scale`` (untrusted): a finite positive number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 < value <= 1e6:
        raise CorruptFile(f"'output_scale' is {str(value)[:40]!r}; allowed: a finite number in (0, 1e6]")
    return float(value)


def _tensor_groups(model: nn.Module) -> dict[int, list[str]]:
    """Every persistent parameter/buffer's names, grouped by tensor identity (tied weights are one tensor, stored once)."""
    groups: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    return groups


def _owner(name: str, manifest: dict) -> str:
    modules = [m for m in manifest["modules"] if name.startswith(m + ".")]
    if modules:
        module = max(modules, key=len)
        return f"module {module!r} ({manifest['modules'][module]['layer']})"
    return f"module {name.rpartition('.')[0] or '<root>'!r}"


def _check_against_header(model: nn.Module, manifest: dict, stored: dict[str, StoredTensor], weights: Path) -> list[list[str]]:
    """Compare the skeleton's persistent tensors with the stored ones; return each stored name's aliases (first stored)."""
    state = model.state_dict(keep_vars=True)
    problems, groups, claimed = [], [], set()
    for names in _tensor_groups(model).values():
        present = [n for n in names if n in stored]
        claimed.update(present)
        if not present:
            problems.append(f"{_owner(names[0], manifest)} needs tensor {names[0]!r}, missing from the file")
            continue
        if len(present) > 1:
            problems.append(f"tensor {present[1]!r} is stored twice (also as {present[0]!r})")
            continue
        tensor, info = state[present[0]], stored[present[0]]
        shape, dtype = tuple(tensor.shape), dtype_name(tensor.dtype)
        if info.shape != shape or not same_dtype_kind(info.dtype, dtype):
            problems.append(f"{_owner(present[0], manifest)} needs {present[0]!r} as {list(shape)} {dtype}, "
                            f"the file holds {list(info.shape)} {info.dtype}")
            continue
        groups.append(present + [n for n in names if n not in present])
    extra = sorted(set(stored) - claimed)
    problems += [f"tensor {name!r} belongs to no parameter of the model" for name in extra]
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise CorruptFile(f"MODEL: {str(weights)!r} does not match the model its manifest and config describe: {problems[0]}{more}")
    return groups


def _bound_transient_buffers(model: nn.Module, stored: dict[str, StoredTensor], weights: Path) -> None:
    # Buffers computed at construction (rotary frequencies, masks) are not stored; the config sizes them, so a hostile
    # config could ask for any amount. Allow no more than the stored tensors themselves (plus a small floor).
    persistent = set(model.state_dict(keep_vars=True))
    transient = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n not in persistent)
    allowed = sum(t.numel * getattr(torch, t.dtype, torch.float32).itemsize for t in stored.values()) + 2 ** 20
    if transient > allowed:
        raise CorruptFile(f"MODEL: the config next to {str(weights)!r} asks for {transient:,} bytes of computed buffers, "
                          f"more than the {allowed:,} bytes of the stored tensors; allowed: a config matching the weights")


def _retie(model: nn.Module, groups: list[list[str]]) -> None:
    """Make tied names one tensor again: moving off the meta device gives every module its own copy."""
    for names in groups:
        if len(names) < 2:
            continue
        first = model.get_parameter(names[0]) if _is_parameter(model, names[0]) else model.get_buffer(names[0])
        for alias in names[1:]:
            owner, _, attribute = alias.rpartition(".")
            module = model.get_submodule(owner)
            if attribute in module._parameters:
                module._parameters[attribute] = first
            else:
                module._buffers[attribute] = first


def _is_parameter(model: nn.Module, name: str) -> bool:
    owner, _, attribute = name.rpartition(".")
    return attribute in model.get_submodule(owner)._parameters


def _stored_tensors(directory: Path) -> tuple[dict[str, Path], dict[str, StoredTensor]]:
    """(tensor name -> the file holding it, tensor name -> its header entry), each file's header read once: the single
    ``model.safetensors`` of older saves, or the shards a ``model.safetensors.index.json`` names (each a regular file
    inside the directory; each tensor in exactly the shard the index names)."""
    if not os.path.lexists(directory / INDEX):
        weights = resolve_inside(directory, WEIGHTS, "weights file")
        stored = safetensors_header(weights)
        return dict.fromkeys(stored, weights), stored
    index_path = directory / INDEX
    index = read_json_object(resolve_inside(directory, INDEX, "weights index"), "weights index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CorruptFile(f"MODEL: weights index {str(index_path)!r} has no 'weight_map' of tensor names to shard files")
    shards = {name: resolve_inside(directory, name, "weights shard") for name in sorted(set(weight_map.values()))}
    where = {tensor: shards[shard] for tensor, shard in weight_map.items()}
    stored = {}
    for path in shards.values():
        for name, info in safetensors_header(path).items():
            if where.get(name) != path:
                raise CorruptFile(f"MODEL: {str(path)!r} holds tensor {name!r}, which the index places elsewhere or nowhere; "
                                  "allowed: each tensor in the one shard its index names")
            stored[name] = info
    missing = sorted(set(where) - set(stored))
    if missing:
        raise CorruptFile(f"MODEL: {str(index_path)!r} names tensors that no shard holds ({', '.join(missing[:3])}"
                          f"{' ...' if len(missing) > 3 else ''})")
    return where, stored


def _fill(model: nn.Module, groups: list[list[str]], where: dict[str, Path]) -> None:
    """Read every stored tensor (refusing non-finite values) into the model's own tensors, strictly, one tensor at a
    time: the weights are never held twice (only the tensor being read is)."""
    from lmshrink.shards import read_safetensors_header, read_tensor

    by_file: dict[Path, list[list[str]]] = {}
    for names in groups:
        by_file.setdefault(where[names[0]], []).append(names)
    filled: set[str] = set()
    unexpected: list[str] = []
    for weights, file_groups in by_file.items():
        try:
            offsets = read_safetensors_header(weights)  # byte ranges (the header was validated by _stored_tensors)
            for names in file_groups:
                tensor = read_tensor(offsets[names[0]], names[0])  # read, not mapped: the file never counts twice
                check_finite(tensor, names[0], weights)
                # load_state_dict one tensor (and its tied names) at a time: the layers' load hooks run as usual
                unexpected += model.load_state_dict(dict.fromkeys(names, tensor), strict=False).unexpected_keys
                filled.update(names)
                del tensor
        except CorruptFile:
            raise
        except Exception as error:  # noqa: BLE001 - the Rust reader raises its own types for a file changed under it
            raise refuse_unreadable(error, "weights file", weights) from error
    missing = sorted(set(model.state_dict(keep_vars=True)) - filled)
    if missing or unexpected:  # the header check makes this unreachable; kept so a silent partial load never happens
        weights = next(iter(by_file), "weights")
        raise CorruptFile(f"MODEL: {str(weights)!r} does not match its manifest: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
