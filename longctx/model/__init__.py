from longctx.model.build import build_block, build_model, model_dims
from longctx.model.lm import Block, LanguageModel

__all__ = ["Block", "LanguageModel", "build_block", "build_model", "model_dims"]
