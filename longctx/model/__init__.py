from longctx.model.build import build_model, model_dims
from longctx.model.lm import LanguageModel

__all__ = ["LanguageModel", "build_model", "model_dims"]
