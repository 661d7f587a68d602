"""What the entry points run: train.py fits and then evaluates, eval.py evaluates or compares.

The one module that uses both training and evaluation (which never import each other), and
where the entry points' shared behaviour lives: wandb's files kept inside the run directory,
and a failure the user can fix reported as one line.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from omegaconf import DictConfig, OmegaConf

from longctx.checkpoints import inspect_checkpoint, local_checkpoint
from longctx.core.cli import errors_in_one_line as one_line_errors
from longctx.core.cli import quiet_known_noise
from longctx.errors import ConfigError
from longctx.eval.run import evaluate_model, run_eval
from longctx.eval.settings import eval_settings
from longctx.train.callbacks import NonFiniteTrainingError
from longctx.train.run import fit

log = logging.getLogger(__name__)

# Failures with a message that says what to change: reported without a traceback.
USER_ERRORS = (ConfigError, NonFiniteTrainingError)
# wandb's own folders, which default to the user's home (logs, artifact staging and cache).
WANDB_FOLDERS = {"WANDB_DIR": ".", "WANDB_CACHE_DIR": "wandb/cache", "WANDB_DATA_DIR": "wandb/data"}


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit; then, with `eval_after_fit`, evaluate the trained model on the test split.

    Evaluation runs in one process on one device. After a multi-process fit (DDP over several
    GPUs or nodes) or a sharded one, it is left to its own job, so that the fit's other GPUs do
    not wait idle for it: the log names the command (docs/cluster.md, "Evaluation").
    """
    if cfg.eval_after_fit:
        eval_settings(cfg.get("eval"))  # a bad evaluation setting fails now, not after training
    with wandb_files_inside(Path(cfg.paths.output_dir)):
        result = fit(cfg)
        if result is None:  # a finished run, requeued: nothing trained, nothing to evaluate
            return {}
        if result.cfg.eval_after_fit:
            _evaluate_after_fit(result)
    return result.metrics


def sweep_objective(metrics: dict[str, float]) -> float:
    """What train.py returns to a sweeper: the last logged validation loss, or the last training
    loss when no validation ran; NaN only when nothing trained (a requeued finished run)."""
    for key in ("val/loss", "train/loss"):
        if key in metrics:
            return float(metrics[key])
    return float("nan")


def _evaluate_after_fit(result) -> None:
    strategy = result.trainer.strategy
    sharded = isinstance(strategy, (FSDPStrategy, ModelParallelStrategy))
    if result.trainer.world_size > 1 or sharded:
        if result.trainer.is_global_zero:
            log.warning(
                "eval_after_fit skipped: %s", separate_evaluation(result.last_checkpoint, strategy)
            )
        return
    evaluate_model(
        result.task.model.float(),
        result.datamodule,
        result.cfg,
        Path(result.cfg.paths.output_dir),
        checkpoint=result.last_checkpoint,
    )


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
    reporting = cfg.get("report") and cfg.report.get("runs")
    if not reporting and cfg.get("ckpt_path"):
        eval_settings(cfg.get("eval"))
        # Every fault of the checkpoint is a clear error here, before its data is prepared.
        with local_checkpoint(cfg.ckpt_path) as local:
            inspect_checkpoint(local, shown=str(cfg.ckpt_path))
    with wandb_files_inside(Path(cfg.paths.output_dir)):
        return run_eval(cfg)


@contextmanager
def wandb_files_inside(run_dir: Path) -> Iterator[None]:
    """wandb writes its logs, caches and table copies under the run directory, not $HOME.

    Folders the user chose (the variable set) stay theirs; the previous environment returns
    afterwards, so each job of a multirun uses its own directory.
    """
    chosen = {
        name: str(run_dir / folder)
        for name, folder in WANDB_FOLDERS.items()
        if name not in os.environ
    }
    os.environ.update(chosen)
    try:
        yield
    finally:
        for name in chosen:
            os.environ.pop(name, None)


@contextmanager
def errors_in_one_line() -> Iterator[None]:
    """The entry points' handling of failures the user can fix (longctx.core.cli).

    A ConfigError or a stopped non-finite run is printed as one line (`error: ...`) and the
    process exits with status 1; HYDRA_FULL_ERROR=1 shows the traceback instead. A ConfigError
    comes before training: the run directory this process created for it is removed.
    """
    quiet_known_noise()
    with one_line_errors(USER_ERRORS, on_config_error=remove_unused_run_dir):
        yield


def remove_unused_run_dir() -> None:
    """Delete this job's run directory if this process created it (its name carries the
    process's `${run_id:}`, conf/hydra/default.yaml) and it holds no checkpoint or results."""
    if not HydraConfig.initialized():
        return
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    created_here = f"_{_this_process_run_id()}" in str(run_dir)
    kept = any(run_dir.glob("checkpoints/*")) or (run_dir / "results.json").exists()
    if created_here and run_dir.is_dir() and not kept:
        shutil.rmtree(run_dir, ignore_errors=True)


def _this_process_run_id() -> str:
    """The token that `${run_id:}` (registered in longctx/__init__.py) gives this process."""
    return OmegaConf.create({"token": "${run_id:}"}).token


def finish_wandb() -> None:
    """Close the wandb run so that the next job of a multirun gets its own."""
    import wandb

    if wandb.run is not None:
        wandb.finish()


def set_matmul_precision() -> None:
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
