"""longctx: train decoder-only LMs with efficient attention and compare them on long documents."""

import secrets
from pathlib import Path

from omegaconf import OmegaConf

from longctx.core.precision import default_training_precision
from longctx.core.run_names import register_resolvers
from longctx.model import LanguageModel, build_model

# `${project_root:}` in conf/paths:
# the checkout that holds conf/ and data/, wherever the user runs from.
OmegaConf.register_new_resolver(
    "project_root", lambda: str(Path(__file__).resolve().parents[1]), replace=True
)
register_resolvers()  # `${run_name:...}` and `${eval_run_name:...}` in conf/train.yaml, eval.yaml
# `${training_precision:<accelerator>}` in conf/trainer: bf16 autocast where the hardware has it.
OmegaConf.register_new_resolver("training_precision", default_training_precision, replace=True)

# `${run_id:}` in conf/hydra: a token drawn once per process, so that runs started in the same
# second get different directories (and longctx.jobs knows which directory this process made).
# Cached, so that Hydra hands the launcher's value to the jobs of a multirun with the config.
_RUN_ID = secrets.token_hex(3)
OmegaConf.register_new_resolver("run_id", lambda: _RUN_ID, replace=True, use_cache=True)

__all__ = ["LanguageModel", "build_model", "export_checkpoint", "load_checkpoint"]
_PRETRAINED = ("export_checkpoint", "load_checkpoint")


def __getattr__(name: str):
    """`longctx.load_checkpoint` and `longctx.export_checkpoint`, imported on first use: they
    need the data layer (tokenizers), which `import longctx` alone should not load (every bench
    worker process imports the package)."""
    if name in _PRETRAINED:
        from longctx import pretrained

        return getattr(pretrained, name)
    raise AttributeError(f"module 'longctx' has no attribute {name!r}")


__version__ = "0.1.0"
