"""longctx: train decoder-only LMs with efficient attention and compare them on long documents."""
from longctx.model import LanguageModel, build_model

__all__ = ["LanguageModel", "build_model"]
__version__ = "0.1.0"
