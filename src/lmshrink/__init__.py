"""lmshrink: shrink language models with low-rank and tensor decompositions.

    import lmshrink
    loaded = lmshrink.load_model("smollm2-135m")
    report = lmshrink.compress(loaded, lmshrink.Plan(method="svd", ratio=0.8), data="wikitext-2")
    lmshrink.save(loaded, "smollm2-svd")
    again = lmshrink.load("smollm2-svd")
"""

__version__ = "0.1.0"

from lmshrink.data import Corpus, load_corpus
from lmshrink.errors import LmshrinkError
from lmshrink.io import load, save
from lmshrink.models import LoadedModel, load_model
from lmshrink.plan import Plan
from lmshrink.surgery import CompressionReport, compress

__all__ = ["CompressionReport", "Corpus", "LmshrinkError", "LoadedModel", "Plan", "compress", "load", "load_corpus",
           "load_model", "save", "__version__"]
