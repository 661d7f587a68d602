"""What the entry points run: train.py fits and then evaluates, eval.py evaluates or compares.

The one module that uses both training and evaluation (which never import each other).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from omegaconf import DictConfig

from longctx.eval.run import evaluate_model, run_eval
from longctx.train.run import fit

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit; then, with `eval_after_fit`, evaluate the trained model on the test split.

    Evaluation runs in one process on one device. After a multi-process fit (DDP over several
    GPUs or nodes) or a sharded one, it is left to its own job, so that the fit's other GPUs do
    not wait idle for it: the log names the command (docs/cluster.md, "Evaluation").
    """
    result = fit(cfg)
    if not cfg.eval_after_fit:
        return result.metrics
    strategy = result.trainer.strategy
    sharded = isinstance(strategy, (FSDPStrategy, ModelParallelStrategy))
    if result.trainer.world_size > 1 or sharded:
        if result.trainer.is_global_zero:
            log.warning(
                "eval_after_fit skipped: %s", separate_evaluation(result.last_checkpoint, strategy)
            )
        return result.metrics
    evaluate_model(
        result.task.model.float(),
        result.datamodule,
        cfg,
        Path(cfg.paths.output_dir),
        checkpoint=result.last_checkpoint,
    )
    return result.metrics


def separate_evaluation(checkpoint: str, strategy) -> str:
    """What to run instead of evaluating after a multi-process or sharded fit."""
    if isinstance(strategy, FSDPStrategy):
        # Sharded checkpoint folders: eval.py needs the weights in one file.
        return (
            "the checkpoint is sharded; consolidate it with `python -m "
            f"lightning.pytorch.utilities.consolidate_checkpoint {checkpoint}` and evaluate "
            f"on one GPU with `python eval.py ckpt_path={checkpoint}.consolidated`"
        )
    return (
        "evaluation runs on one GPU while the others would wait; evaluate as its own job "
        f"with `python eval.py ckpt_path={checkpoint}`"
    )


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
