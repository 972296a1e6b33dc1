"""Makes ``lm_eval --model lmshrink`` work: lm-eval (0.4) finds models only in its own table or in what was
registered in the same process, and reads no package entry points, so lmshrink registers its model there itself.

Run at every interpreter start by ``lmshrink_lm_eval.pth`` (installed beside the package), this module only adds a
watcher for the import of ``lm_eval.models``; when lm-eval loads its model table, the name "lmshrink" is added as a
lazy "module:class" entry, so nothing of lmshrink or torch is imported until lm-eval asks for that model. It uses
the standard library only and never raises. ``LMSHRINK_NO_LM_EVAL_HOOK=1`` turns it off.
"""

import importlib.abc
import importlib.machinery
import os
import sys

MODEL_NAME = "lmshrink"
MODEL_TARGET = "lmshrink.lm_eval_model:LmshrinkLM"
WATCHED = "lm_eval.models"


def register() -> None:
    """Add the lazy "lmshrink" entry to lm-eval's model registry (a no-op when it is there or lm-eval is too old)."""
    try:
        from lm_eval.api.registry import model_registry

        if MODEL_NAME not in model_registry:
            model_registry.register(MODEL_NAME, target=MODEL_TARGET)
    except Exception:  # an lm-eval without this registry: `lmshrink-lm-eval` still works
        pass


class _Loader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        register()


class _Finder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: it wraps the loader of ``lm_eval.models`` so that register() runs after it."""

    def find_spec(self, name, path=None, target=None):
        if name != WATCHED:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    if os.environ.get("LMSHRINK_NO_LM_EVAL_HOOK") or any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    if WATCHED in sys.modules:
        register()
    else:
        sys.meta_path.insert(0, _Finder())


try:
    install()
except Exception:  # interpreter start must never fail because of lmshrink
    pass
