"""Where a model runs and in which dtype: ``--device`` and ``--dtype`` of every command, and ``device=``/``dtype=`` in Python.

Weights are held (and saved) in the chosen dtype; each matrix's factorization math runs in float32 (methods upcast),
calibration accumulates its statistics in float32 and evaluation takes its log-softmax in float32.
"""

from __future__ import annotations

import torch
from torch import nn

from lmshrink.errors import InvalidArgument

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_CHOICES = ("auto", "cpu", "cuda")
DTYPE_CHOICES = ("auto", *DTYPES)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _machine() -> str:
    return f"torch {torch.__version__} built {'with' if torch.backends.cuda.is_built() else 'without'} CUDA, {torch.get_num_threads()} CPU threads"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """"auto" (CUDA when present), "cpu", "cuda" or "cuda:N"; asking for CUDA on a machine without it is an error."""
    text = "auto" if device is None else str(device)
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise InvalidArgument("--device", f"{text!r} was asked but this machine has no CUDA device ({_machine()})", "cpu or auto")
        try:
            found = torch.device(text)
        except RuntimeError:
            raise InvalidArgument("--device", f"{text!r} is not a device", "cpu, cuda, cuda:N or auto") from None
        if found.index is not None and found.index >= torch.cuda.device_count():
            raise InvalidArgument("--device", f"{text!r}: this machine has {torch.cuda.device_count()} CUDA devices",
                                  f"cuda:0 to cuda:{torch.cuda.device_count() - 1}, cpu or auto")
        return found
    raise InvalidArgument("--device", f"{text!r} is not a device", "cpu, cuda, cuda:N or auto (CUDA when present)")


def resolve_dtype(dtype: str | torch.dtype | None, source, device: torch.device) -> torch.dtype:
    """"auto" (or None) is the dtype the checkpoint declares (``source.declared_dtype()``: config dtype; a GGUF:
    bfloat16); else float32 / bfloat16 / float16. A dtype the device cannot run is an error."""
    if dtype is None or dtype == "auto":
        chosen = source.declared_dtype()
    elif isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        chosen = dtype
    elif isinstance(dtype, str) and dtype in DTYPES:
        chosen = DTYPES[dtype]
    else:
        raise InvalidArgument("--dtype", f"{dtype!r} is not supported", ", ".join(DTYPE_CHOICES))
    if chosen not in DTYPES.values():
        chosen = torch.float32  # a checkpoint in float64 or an integer type: work in float32
    check_runs(chosen, device)
    return chosen


def check_runs(dtype: torch.dtype, device: torch.device) -> None:
    """Refuse a dtype the device cannot compute in."""
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise InvalidArgument("--dtype", f"bfloat16 does not run on {torch.cuda.get_device_name(device)}", "float16 or float32 on this GPU")


class DeclaredDtype:
    """What a loaded model's checkpoint declares (the ``source`` side of ``resolve_dtype`` for the whole-model path):
    a GGUF: bfloat16; a Hugging Face directory: its config.json's dtype; else the model's config, else its parameters."""

    def __init__(self, model: nn.Module, path=None):
        self.model, self.path = model, path

    def declared_dtype(self) -> torch.dtype:
        from pathlib import Path

        path = Path(str(self.path)) if self.path is not None else None
        if path is not None and path.suffix == ".gguf":
            return torch.bfloat16  # quantized weights have no float dtype of their own; bf16 holds them with float32's range
        declared = None
        if path is not None and (path / "config.json").is_file():
            from lmshrink.models.hf import checked_config  # the one config reader (capped, auto_map refused)

            config = checked_config(path)
            declared = config.get("dtype") or config.get("torch_dtype")
        if declared is None:  # a model given in memory: its config (transformers records the dtype it was built in)
            config = getattr(self.model, "config", None)
            declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(declared, str):
            declared = getattr(torch, declared, None)
        return declared if isinstance(declared, torch.dtype) else model_dtype(self.model)


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of a model's floating parameters (float32 when it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def model_device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def place(loaded, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None, source_path=None):
    """Move ``loaded``'s model to ``device`` and cast its floating parameters to ``dtype``, in place; returns it.

    ``device``/``dtype`` None leave it where and as it is; "auto" resolves as ``resolve_device`` / ``resolve_dtype``
    (the declared dtype of ``source_path``'s checkpoint, or of the model). Buffers keep their dtype (rotary
    frequencies and masks stay float32, as in a model built in that dtype); tied parameters stay tied.
    """
    model = loaded.model
    target = resolve_device(device) if device is not None else model_device(model)
    chosen = resolve_dtype(dtype, DeclaredDtype(model, source_path), target) if dtype is not None else None
    if chosen is None:
        check_runs(model_dtype(model), target)
    if target != model_device(model):
        model.to(target)
    if chosen is not None and chosen != model_dtype(model):
        for parameter in model.parameters():  # parameters() yields a tied one once: assigning .data keeps it tied
            if parameter.is_floating_point():
                parameter.data = parameter.data.to(chosen)
    return loaded
