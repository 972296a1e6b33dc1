"""lmshrink: shrink language models with low-rank and tensor decompositions.

    import lmshrink
    loaded = lmshrink.load_model("smollm2-135m")
    report = lmshrink.compress(loaded, lmshrink.Plan(method="fwhiten", ratio=0.8), data="wikitext-2")
    lmshrink.finetune(loaded, "wikitext-2", steps=200)   # optional refinement training of the factors
    lmshrink.save(loaded, "smollm2-fw")
    again = lmshrink.load("smollm2-fw")

    # or the whole `lmshrink compress` workflow (evaluate, compress, fine-tune, evaluate, time, save) in one call:
    result = lmshrink.run_compress("smollm2-135m", lmshrink.Plan(method="fwhiten", ratio=0.8), out="smollm2-fw")
"""

from lmshrink.version import __version__

from lmshrink.data import Corpus, load_corpus
from lmshrink.errors import LmshrinkError
from lmshrink.finetune import finetune
from lmshrink.io import load, save
from lmshrink.models import LoadedModel, load_model
from lmshrink.pipeline import CompressResult, EvalOptions, FinetuneOptions
from lmshrink.pipeline import run as run_compress
from lmshrink.plan import Plan
from lmshrink.surgery import CompressionReport, compress

from lmshrink import hf_compat as _hf_compat

_hf_compat.register()  # transformers' Auto classes load saved lmshrink directories (model type "lmshrink")

__all__ = ["CompressResult", "CompressionReport", "Corpus", "EvalOptions", "FinetuneOptions", "LmshrinkError", "LoadedModel", "Plan",
           "compress", "finetune", "load", "load_corpus", "load_model", "run_compress", "save", "__version__"]
