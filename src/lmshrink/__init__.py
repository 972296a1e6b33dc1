"""lmshrink: shrink language models with low-rank and tensor decompositions.

    import lmshrink
    loaded = lmshrink.load_model("smollm2-135m")
    report = lmshrink.compress(loaded, lmshrink.Plan(method="fwhiten", ratio=0.8), data="wikitext-2")
    lmshrink.finetune(loaded, "wikitext-2", steps=200)   # optional refinement training of the factors
    lmshrink.save(loaded, "smollm2-fw")
    again = lmshrink.load("smollm2-fw")
"""

from lmshrink.version import __version__

from lmshrink.data import Corpus, load_corpus
from lmshrink.errors import LmshrinkError
from lmshrink.finetune import finetune
from lmshrink.io import load, save
from lmshrink.models import LoadedModel, load_model
from lmshrink.plan import Plan
from lmshrink.surgery import CompressionReport, compress

from lmshrink import hf_compat as _hf_compat

_hf_compat.register()  # transformers' Auto classes load saved lmshrink directories (model type "lmshrink")

__all__ = ["CompressionReport", "Corpus", "LmshrinkError", "LoadedModel", "Plan", "compress", "finetune", "load", "load_corpus",
           "load_model", "save", "__version__"]
