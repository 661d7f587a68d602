"""From a checkpoint to text and to other tools: `load_checkpoint` and `export_checkpoint`.

`load_checkpoint(path) -> (model, tokenizer, cfg)` reads a training checkpoint (a .ckpt file or
URL, loaded weights-only by longctx.checkpoints) or a directory `export_checkpoint` wrote. The
tokenizer comes from the checkpoint itself (train.py stores it there), so a checkpoint turns
into text without the run's data cache.

`export_checkpoint(ckpt, directory)` writes Hugging Face's layout: `model.safetensors`,
`config.json`, and the tokenizer's `tokenizer.json` / `tokenizer_config.json`. The methods
mirror Hugging Face's API (`save_pretrained` / `from_pretrained` on LanguageModel and the
tokenizers); the directory is longctx's own model type, which `transformers` does not load.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from longctx.checkpoints import (
    checkpoint_info,
    is_url,
    model_from_contents,
    read_checkpoint,
    stored_tokenizer,
)
from longctx.data import build_tokenizer, corpus_fingerprint
from longctx.data.tokenizer import (
    TOKENIZER_CONFIG,
    Tokenizer,
    tokenizer_from_pretrained,
)
from longctx.errors import ConfigError
from longctx.model import LanguageModel
from longctx.model.lm import BUILD_KEYS, PRETRAINED_CONFIG, pretrained_config


def load_checkpoint(
    path: str | os.PathLike,
) -> tuple[LanguageModel, Tokenizer | None, dict[str, Any]]:
    """The trained model (fp32, CPU, eval mode), its tokenizer and the run's config.

    `path`: a checkpoint written by train.py (local file or URL) or a directory written by
    `export_checkpoint`. The tokenizer is None for runs on generated token ids (data=mqar).
    """
    if not is_url(path) and Path(path).is_dir() and (Path(path) / PRETRAINED_CONFIG).exists():
        return _load_exported(Path(path))
    contents = read_checkpoint(path)
    info = checkpoint_info(contents, str(path))
    model = model_from_contents(contents, info)
    return model.eval(), _checkpoint_tokenizer(contents, info.cfg, str(path)), info.cfg


def export_checkpoint(ckpt_path: str | os.PathLike, directory: str | os.PathLike) -> Path:
    """Write the checkpoint's model, config and tokenizer into a new `directory` (safetensors
    weights: loading them runs no code). An existing non-empty directory is refused: nothing
    of the user's is overwritten."""
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ConfigError(f"out_dir={directory} already exists and is not empty; name a new folder")
    model, tokenizer, cfg = load_checkpoint(ckpt_path)
    model.save_pretrained(directory, run_config=cfg)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def _load_exported(directory: Path) -> tuple[LanguageModel, Tokenizer | None, dict[str, Any]]:
    config = pretrained_config(directory)
    model = LanguageModel.from_pretrained(directory)
    has_tokenizer = (directory / TOKENIZER_CONFIG).is_file()
    tokenizer = tokenizer_from_pretrained(directory) if has_tokenizer else None
    cfg = config.get("run_config") or {key: config[key] for key in BUILD_KEYS}
    return model.eval(), tokenizer, cfg


def _checkpoint_tokenizer(
    contents: dict[str, Any], cfg: dict[str, Any], shown: str
) -> Tokenizer | None:
    """The tokenizer stored in the checkpoint; for a checkpoint written before tokenizers were
    stored, the one its config names (byte; a tokenizer file or a cached bpe that still
    exist)."""
    stored = stored_tokenizer(contents)
    if stored is not None:
        return stored
    if cfg.get("data", {}).get("source") == "mqar":
        return None
    tokenizer_cfg = cfg.get("tokenizer") or {"name": "byte"}
    try:
        if tokenizer_cfg.get("name") == "bpe":
            data_cfg = cfg["data"]
            return build_tokenizer(
                tokenizer_cfg, None, data_cfg["cache_dir"], corpus_fingerprint(data_cfg)
            )
        return build_tokenizer(tokenizer_cfg)
    except (ValueError, OSError, KeyError, ConfigError) as error:
        raise ConfigError(
            f"ckpt_path={shown} was written before checkpoints held their tokenizer, and its "
            f"tokenizer ({tokenizer_cfg.get('name')}) cannot be rebuilt here ({error}); load it "
            "where the run's data cache is, or retrain with this version of longctx"
        ) from None
