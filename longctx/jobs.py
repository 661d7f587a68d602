"""What the entry points run: train.py fits and then evaluates, eval.py evaluates or compares.

The one module that uses both training and evaluation (which never import each other).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from lightning.pytorch.strategies import FSDPStrategy
from omegaconf import DictConfig

from longctx.eval.run import evaluate_model, run_eval
from longctx.train.run import fit

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit; then, with `eval_after_fit`, evaluate the trained model on the test split."""
    result = fit(cfg)
    if cfg.eval_after_fit and result.trainer.is_global_zero:
        if isinstance(result.trainer.strategy, FSDPStrategy):
            # The model's weights are sharded over the ranks: rank 0 alone cannot run it.
            log.warning(
                "eval_after_fit skipped under FSDP; consolidate the sharded checkpoint with "
                "`python -m lightning.pytorch.utilities.consolidate_checkpoint %s` "
                "and run eval.py on the result",
                result.last_checkpoint,
            )
        else:
            evaluate_model(
                result.task.model.float(),
                result.datamodule,
                cfg,
                Path(cfg.paths.output_dir),
                checkpoint=result.last_checkpoint,
            )
    return result.metrics


def evaluate(cfg: DictConfig) -> dict:
    """eval.py: a report over many runs (`report.runs`), or one checkpoint's evaluation."""
    return run_eval(cfg)


def finish_wandb() -> None:
    """Close the wandb run so that the next job of a multirun gets its own."""
    import wandb

    if wandb.run is not None:
        wandb.finish()


def set_matmul_precision() -> None:
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
