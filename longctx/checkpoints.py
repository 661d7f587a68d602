"""Reading a run's checkpoint: tensors and plain values only, never pickled code.

A longctx checkpoint is a Lightning checkpoint whose hyper-parameters hold the run's resolved
config (plain dicts and lists) and the vocabulary size, so the model can be rebuilt from the
file alone. It is loaded with `weights_only=True`: a file that would need unpickling arbitrary
objects is refused rather than executed.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from longctx.model import LanguageModel, build_model

# LightningModule attribute that holds the LanguageModel: its weights are prefixed with it.
MODEL_PREFIX = "model."


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's contents on the CPU, loaded without unpickling code."""
    return torch.load(path, map_location="cpu", weights_only=True)


def model_from_checkpoint(path: str | os.PathLike) -> tuple[LanguageModel, dict[str, Any]]:
    """The trained LanguageModel (fp32, on the CPU) and the run's config dict."""
    checkpoint = read_checkpoint(path)
    hparams = checkpoint["hyper_parameters"]
    cfg = hparams["cfg"]
    model = build_model(cfg, hparams["vocab_size"])
    weights = {
        key.removeprefix(MODEL_PREFIX): value
        for key, value in checkpoint["state_dict"].items()
        if key.startswith(MODEL_PREFIX)
    }
    model.load_state_dict(weights)
    return model.float(), cfg
