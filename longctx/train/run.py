"""`train(cfg)`: validate, prepare data, fit with Lightning, evaluate. train.py is a thin Hydra wrapper."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ThroughputMonitor
from omegaconf import DictConfig

from longctx.attention import build_backend
from longctx.data import LongDocDataModule
from longctx.eval.run import evaluate_model
from longctx.model import model_dims
from longctx.train.module import LanguageModelTask

log = logging.getLogger(__name__)


def validate_config(cfg: DictConfig):
    """Every config error a run can detect without data: raised before any data preparation."""
    dims = model_dims(cfg)
    backend = build_backend(cfg.attention, dims)
    backend.check_sequence_length(cfg.context_length)
    return backend


def build_datamodule(cfg: DictConfig, ordered_stream: bool) -> LongDocDataModule:
    return LongDocDataModule(
        data_cfg=cfg.data,
        tokenizer_cfg=cfg.tokenizer,
        context_length=cfg.context_length,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        sampling="ordered" if ordered_stream else "packed",
        seed=cfg.seed,
    )


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path) -> str | None:
    """`last` means this run directory's checkpoints/last.ckpt (resume with hydra.run.dir=<that run>)."""
    if ckpt_path != "last":
        return ckpt_path
    last = output_dir / "checkpoints" / "last.ckpt"
    if not last.exists():
        raise FileNotFoundError(
            f"ckpt_path=last but {last} does not exist; resume by pointing hydra.run.dir at the run to continue"
        )
    return str(last)


def train(cfg: DictConfig) -> dict:
    os.environ.setdefault("WANDB_MODE", "offline")
    backend = validate_config(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)

    datamodule = build_datamodule(cfg, backend.ordered_stream)
    datamodule.prepare_data()
    datamodule.setup("fit")
    task = LanguageModelTask(cfg, datamodule.vocab_size)
    tokens_per_batch = cfg.batch_size * cfg.context_length
    task.flops_per_batch = training_flops_per_batch(task, cfg.context_length, tokens_per_batch)

    checkpoint = ModelCheckpoint(
        dirpath=output_dir / "checkpoints",
        filename="step{step:06d}",
        auto_insert_metric_name=False,
        save_last=True,
        save_top_k=1,
        monitor="val/loss",
        every_n_train_steps=cfg.trainer.get("val_check_interval") or None,
    )
    callbacks = [
        checkpoint,
        LearningRateMonitor(logging_interval="step"),
        ThroughputMonitor(
            batch_size_fn=lambda batch: batch["input_ids"].shape[0],
            length_fn=lambda batch: batch["input_ids"].numel(),
        ),
    ]
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger)
    if logger:
        logger.log_hyperparams({"model/params": task.model.num_parameters(), "data/vocab_size": datamodule.vocab_size})

    trainer.fit(task, datamodule=datamodule, ckpt_path=resolve_ckpt_path(cfg.ckpt_path, output_dir))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    metrics["unigram_entropy"] = datamodule.unigram_entropy()
    log.info("final metrics: %s", metrics)

    if cfg.eval_after_fit and trainer.is_global_zero:
        evaluate_model(task.model.float(), datamodule, cfg, output_dir, checkpoint=checkpoint.last_model_path)
    return metrics


def training_flops_per_batch(task: LanguageModelTask, seq_len: int, tokens: int) -> float | None:
    try:
        from longctx.flops import training_flops_per_token
    except ImportError:
        return None
    try:
        return training_flops_per_token(task.model, seq_len) * tokens
    except NotImplementedError:
        return None


def finish_wandb() -> None:
    """Close the wandb run so that the next job of a multirun gets its own."""
    import wandb

    if wandb.run is not None:
        wandb.finish()


def set_matmul_precision() -> None:
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
