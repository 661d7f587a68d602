"""Checks of the data a run is about to train on, each with the counts that fail it."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from longctx.data import LongDocDataModule
from longctx.data.files import expand_patterns
from longctx.data.mqar import MQARDataModule
from longctx.errors import ConfigError


def check_data_sources(cfg: DictConfig) -> None:
    """Every data.data_files glob matches a file and a tokenizer file exists: said before the
    corpus is read, not as a failure halfway through preparing it."""
    if OmegaConf.is_missing(cfg.data, "data_files"):
        raise ConfigError(
            f"data={cfg.data.get('name')} needs data.data_files: a glob such as "
            "data.data_files='/books/**/*.txt', or {train: <glob>, validation: <glob>, "
            "test: <glob>}"
        )
    data_files = cfg.data.get("data_files")
    if data_files and cfg.data.get("source") in ("files", "hub"):
        plain = (
            OmegaConf.to_container(data_files, resolve=True)
            if OmegaConf.is_config(data_files)
            else data_files
        )
        per_split = plain if isinstance(plain, dict) else {"all": plain}
        for split, patterns in per_split.items():
            for pattern in [patterns] if isinstance(patterns, str) else patterns:
                if not expand_patterns(pattern):
                    where = "" if split == "all" else f" ({split})"
                    raise ConfigError(
                        f"data.data_files{where} pattern {pattern!r} matches no file; "
                        "check the path (** matches folders recursively)"
                    )
    tokenizer = cfg.get("tokenizer") or {}
    if (
        tokenizer.get("name") == "file"
        and not Path(str(tokenizer.get("path"))).expanduser().is_file()
    ):
        raise ConfigError(
            f"tokenizer.path={tokenizer.get('path')} does not exist; give the path of a "
            "tokenizer.json"
        )


def check_enough_data(
    cfg: DictConfig, datamodule: LongDocDataModule, sampling: str, world_size: int
) -> None:
    """At least one training batch per rank, and something to validate on when validating.

    Counted as longctx.data.packing cuts a split: packed windows of context_length + 1 tokens,
    dealt to the ranks for training; or, ordered, one row per batch element and rank, each row
    needing more than context_length tokens.
    """
    if isinstance(datamodule, MQARDataModule):
        _check_mqar_batches(datamodule, world_size)
        return
    splits = ["train"]
    if cfg.trainer.get("limit_val_batches") != 0:
        splits.append("validation")
    length, rows = cfg.context_length, cfg.batch_size * world_size
    batch = f"batch_size={cfg.batch_size} x {world_size} rank(s) = {rows}"
    for split in splits:
        tokens = len(datamodule.split_tokens(split))
        if sampling == "ordered":
            if (tokens // rows - 1) // length >= 1:
                continue
            problem = (
                f"{tokens} tokens, which {batch} rows cut into rows of {tokens // rows} tokens, "
                f"not more than context_length + 1 = {length + 1}"
            )
        else:
            windows = max((tokens - 1) // length, 0)
            needed = rows if split == "train" else 1
            if windows >= needed:
                continue
            problem = (
                f"{windows} windows of context_length + 1 = {length + 1} tokens, fewer than "
                + (f"one batch of {batch} windows" if split == "train" else "one")
            )
        raise ConfigError(
            f"the {split} split has {problem}. Lower batch_size or context_length, or give the "
            "corpus more text"
        )


def _check_mqar_batches(datamodule: MQARDataModule, world_size: int) -> None:
    """Generated examples: every rank gets at least one full batch of one setting (validation
    always has data.validation_examples of each)."""
    if datamodule.fewest_training_batches(world_size) >= 1:
        return
    settings = ", ".join(
        f"{s.seq_len}/{s.num_pairs}: {s.examples} examples, batches of "
        f"{datamodule.rows_per_batch(s.seq_len)}"
        for s in datamodule.train_settings
    )
    raise ConfigError(
        f"data=mqar gives {world_size} rank(s) no full training batch ({settings}). Raise "
        "examples in data.train_settings, or lower data.batch_tokens (batch_size when it is null)"
    )
