"""Evaluation runs: perplexity by context length on the test split, written to the run directory."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from longctx.eval.outputs import log_to_wandb, write_results
from longctx.eval.perplexity import perplexity_by_context_length

log = logging.getLogger(__name__)


def evaluate_model(model, datamodule, cfg, output_dir: Path, checkpoint: str | None = None) -> dict:
    """Score the test split at every `cfg.eval.context_lengths` and write results.{json,csv} + PNG."""
    eval_cfg = cfg["eval"]
    model.eval()
    tokens = torch.as_tensor(datamodule.split_tokens("test").astype("int64"))
    strides = list(eval_cfg.get("strides") or [None])
    rows = perplexity_by_context_length(
        model,
        tokens,
        list(eval_cfg["context_lengths"]),
        decode=datamodule.tokenizer.decode,
        max_scored=int(eval_cfg["max_tokens"]),
        batch_size=int(eval_cfg["batch_size"]),
        strides=strides,
    )
    rows = [row.as_dict() for row in rows]
    meta = {
        "attention": cfg["attention"]["name"],
        "attention_options": _plain(cfg["attention"]),
        "model": _plain(cfg["model"]),
        "train_context_length": int(cfg["context_length"]),
        "data": cfg["data"]["name"],
        "tokenizer": datamodule.tokenizer.name,
        "split": "test",
        "checkpoint": checkpoint,
    }
    paths = write_results(output_dir, meta, rows)
    log_to_wandb(rows, paths)
    for row in rows:
        log.info("ctx %5d %-8s ppl %s bpb %s %s", row["context_length"], row["protocol"], _fmt(row["ppl"]),
                 _fmt(row["bpb"]), row["skipped"] or "")
    return {"meta": meta, "rows": rows, "paths": paths}


def _plain(node):
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def evaluate_checkpoint(cfg: DictConfig) -> dict:
    """eval.py: rebuild the model and data of a checkpoint's run, then evaluate with `cfg.eval`."""
    from longctx.train.module import LanguageModelTask
    from longctx.train.run import build_datamodule

    os.environ.setdefault("WANDB_MODE", "offline")
    task = LanguageModelTask.load_from_checkpoint(cfg.ckpt_path, map_location="cpu")
    run_cfg = OmegaConf.create(task.hparams["cfg"])
    run_cfg.eval = cfg.eval
    # Data and tokenizer must be the checkpoint's (the vocabulary depends on them); only where
    # caches live may differ between machines.
    run_cfg.data.cache_dir = cfg.paths.data_dir + "/cache"
    datamodule = build_datamodule(run_cfg, ordered_stream=False)
    datamodule.prepare_data()
    datamodule.setup("test")
    logger = None
    if cfg.get("logger"):
        from hydra.utils import instantiate

        logger = instantiate(cfg.logger)
        logger.experiment  # starts the wandb run so tables and images are logged to it
    return evaluate_model(task.model.float(), datamodule, run_cfg, Path(cfg.paths.output_dir), str(cfg.ckpt_path))
