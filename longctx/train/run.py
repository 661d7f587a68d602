"""`fit(cfg)`: validate, build the trainer, prepare data and fit with Lightning.

`longctx.jobs` runs it for train.py and evaluates the result; training never imports evaluation.
"""

from __future__ import annotations

import logging
import os
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ProgressBar
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins.io import CheckpointIO
from omegaconf import DictConfig

from longctx.attention import Backend, build_backend
from longctx.checkpoints import inspect_checkpoint, local_checkpoint
from longctx.data import LongDocDataModule, build_datamodule
from longctx.errors import ConfigError
from longctx.flops import training_flops_per_token
from longctx.model import build_model, model_dims
from longctx.train.callbacks import (
    CheckpointSchemaStamp,
    FinalStepCheckpoint,
    NonFiniteGuard,
    RandomStateCheckpoint,
    StreamStateCheckpoint,
)
from longctx.train.checkpoint_io import AtomicCheckpointIO
from longctx.train.csv_history import ResumableCSVLogger
from longctx.train.data_checks import check_data_sources, check_enough_data
from longctx.train.loggers import wandb_run_id
from longctx.train.metrics_file import MetricsFile
from longctx.train.module import LanguageModelTask
from longctx.train.resume import command_line_overrides, continue_run, explicit_setting
from longctx.train.run_dir import claim_run_dir, refuse_another_runs_dir, remove_stale_partial_files
from longctx.train.validation import validate_numbers

log = logging.getLogger(__name__)

SAMPLING_CHOICES = ("auto", "packed", "ordered")
# Any vocabulary size builds the same layers; the real one is known only once the data is ready.
_PLACEHOLDER_VOCAB = 2


def validate_config(cfg: DictConfig) -> Backend:
    """Every config error a run can detect without data: raised before any data preparation."""
    validate_numbers(cfg)
    backend = build_backend(cfg.attention, model_dims(cfg))
    backend.check_sequence_length(cfg.context_length)
    training_sampling(cfg, backend)
    checkpoint_interval(cfg)
    # The whole model on the meta device: every layer's own checks run, no memory is used.
    with torch.device("meta"):
        build_model(cfg, _PLACEHOLDER_VOCAB)
    return backend


def training_sampling(cfg: DictConfig, backend: Backend) -> str:
    """`packed` or `ordered` from cfg.sampling; `auto` follows the backend."""
    sampling = cfg.get("sampling", "auto")
    if sampling not in SAMPLING_CHOICES:
        raise ConfigError(
            f"sampling={sampling!r} is not valid; choose one of {list(SAMPLING_CHOICES)}"
        )
    if backend.ordered_stream and sampling == "packed":
        raise ConfigError(
            f"attention={cfg.attention.name} carries memory from one batch to the next, "
            "which needs ordered streams (each batch continuing the previous one); "
            "packed windows are shuffled. Set sampling=auto or sampling=ordered"
        )
    if sampling == "auto":
        return "ordered" if backend.ordered_stream else "packed"
    return sampling


def checkpoint_interval(cfg: DictConfig) -> int:
    """Optimizer steps between checkpoints:
    cfg.checkpoint_every_n_steps, else trainer.val_check_interval."""
    every = cfg.get("checkpoint_every_n_steps")
    if every is None:
        every = cfg.trainer.get("val_check_interval")
        if not isinstance(every, int) or isinstance(every, bool):
            raise ConfigError(
                f"trainer.val_check_interval={every!r} is not a number of steps, "
                "so it cannot set the checkpoint interval; set checkpoint_every_n_steps=<steps>"
            )
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise ConfigError(
            f"checkpoint_every_n_steps must be a positive number of steps, got {every!r}"
        )
    return every


def build_callbacks(cfg: DictConfig, output_dir: Path) -> tuple[list[Callback], ModelCheckpoint]:
    """The run's callbacks, and the one that writes checkpoints/last.ckpt."""
    every = checkpoint_interval(cfg)
    last = FinalStepCheckpoint(
        dirpath=output_dir / "checkpoints",
        filename="step{step:06d}",
        auto_insert_metric_name=False,
        every_n_train_steps=every,
        save_top_k=0,
        save_last=True,
        # Always last.ckpt, which ckpt_path=last reads: Lightning would write last-v1.ckpt next
        # to a last.ckpt it did not write itself in this run (its state comes back from the
        # checkpoint only while checkpoint_every_n_steps, part of its state key, is unchanged).
        enable_version_counter=False,
    )
    # Saved when validation ends, so that it ranks the validation loss just measured.
    best = ModelCheckpoint(
        dirpath=output_dir / "checkpoints",
        filename="best-step{step:06d}",
        auto_insert_metric_name=False,
        monitor="val/loss",
        save_top_k=1,
    )
    callbacks = [
        last,
        best,
        NonFiniteGuard(last),
        CheckpointSchemaStamp(),
        RandomStateCheckpoint(),
        StreamStateCheckpoint(every),
        MetricsFile(output_dir),
    ]
    return callbacks + configured_callbacks(cfg), last


def configured_callbacks(cfg: DictConfig) -> list[Callback]:
    """The `callbacks` group (conf/callbacks): each entry built from its `_target_`.

    A progress bar is left out when trainer.enable_progress_bar is false (Lightning refuses
    both), so that trainer=debug needs no callbacks override.
    """
    built = []
    for name, spec in (cfg.get("callbacks") or {}).items():
        if not isinstance(spec, DictConfig) or "_target_" not in spec:
            raise ConfigError(
                f"callbacks.{name} is not a callback config; give it a `_target_` "
                "(a Callback class) and its arguments, as in conf/callbacks/"
            )
        callback = instantiate(spec)
        if not isinstance(callback, Callback):
            raise ConfigError(
                f"callbacks.{name}: {spec._target_} is not a Lightning Callback; "
                "name a subclass of lightning.pytorch.callbacks.Callback"
            )
        built.append(callback)
    if cfg.trainer.get("enable_progress_bar") is False:
        built = [c for c in built if not isinstance(c, ProgressBar)]
    return built


def build_trainer(cfg: DictConfig, callbacks: list[Callback], logger) -> pl.Trainer:
    """cfg.trainer instantiated;
    checkpoints are written atomically unless it brings its own CheckpointIO."""
    plugins = list(instantiate(cfg.trainer.get("plugins")) or [])
    if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
        plugins.append(AtomicCheckpointIO())
    return instantiate(cfg.trainer, callbacks=callbacks, logger=logger, plugins=plugins)


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path) -> str | None:
    """`last` is the newest of this run directory's checkpoints/last.ckpt
    and SLURM's hpc_ckpt_*.ckpt.

    With none there yet the run starts from scratch, so one command line serves the first
    start and every restart after a preemption (resume with hydra.run.dir=<that run>).
    """
    if ckpt_path != "last":
        return ckpt_path
    candidates = [output_dir / "checkpoints" / "last.ckpt", *output_dir.glob("hpc_ckpt_*.ckpt")]
    existing = [path for path in candidates if path.exists()]
    if not existing:
        log.warning("ckpt_path=last: no checkpoint in %s yet, starting from scratch", output_dir)
        return None
    return str(max(existing, key=lambda path: path.stat().st_mtime))


@dataclass
class FitResult:
    """What a fit leaves for whoever runs next (evaluation after fit, tests)."""

    metrics: dict[str, float]
    task: LanguageModelTask
    datamodule: LongDocDataModule
    trainer: pl.Trainer
    last_checkpoint: str
    cfg: DictConfig  # the config the run trained with (a resume restores parts of it)


def fit(cfg: DictConfig) -> FitResult | None:
    """Validate, build the trainer, prepare data, and fit with Lightning.

    None when the checkpoint resumed is already at trainer.max_steps: a requeued finished run
    says so and leaves its outputs untouched.
    """
    os.environ.setdefault("WANDB_MODE", "offline")
    output_dir = Path(cfg.paths.output_dir)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir)
    with ExitStack() as stack:
        local_ckpt = stack.enter_context(local_checkpoint(ckpt_path)) if ckpt_path else None
        start_step = 0
        if local_ckpt is not None:
            info = inspect_checkpoint(local_ckpt, shown=ckpt_path, for_resume=True)
            cfg = continue_run(cfg, info.cfg, ckpt_path, explicit_setting(command_line_overrides()))
            start_step = info.global_step
        backend = validate_config(cfg)
        if start_step >= cfg.trainer.max_steps:
            log.warning(
                "%s is at step %d and trainer.max_steps=%d: the run is finished, nothing to do "
                "(its outputs are left as they are). Raise trainer.max_steps to train further",
                ckpt_path,
                start_step,
                cfg.trainer.max_steps,
            )
            return None
        stack.enter_context(claim_run_dir(output_dir))
        refuse_another_runs_dir(output_dir, ckpt_path)
        remove_stale_partial_files(output_dir)
        return _fit(cfg, backend, output_dir, local_ckpt, start_step)


def _fit(
    cfg: DictConfig, backend: Backend, output_dir: Path, ckpt: Path | None, start_step: int
) -> FitResult:
    callbacks, last_checkpoint = build_callbacks(cfg, output_dir)
    logger = build_logger(cfg, start_step)
    # Before the data: a wrong trainer setting fails in seconds, not after tokenising a corpus.
    trainer = build_trainer(cfg, callbacks, logger)

    check_data_sources(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    sampling = training_sampling(cfg, backend)
    datamodule = build_datamodule(cfg, sampling == "ordered")
    datamodule.prepare_data()
    datamodule.setup("fit")
    check_enough_data(cfg, datamodule, sampling, trainer.world_size)
    task = LanguageModelTask(cfg, datamodule.vocab_size)
    tokenizer = getattr(datamodule, "tokenizer", None)  # None: generated token ids (mqar)
    task.tokenizer_state = tokenizer.to_state() if tokenizer is not None else None
    tokens_per_batch = cfg.batch_size * cfg.context_length
    task.flops_per_batch = training_flops_per_batch(task, cfg.context_length, tokens_per_batch)
    if logger:
        logger.log_hyperparams(
            {"model/params": task.model.num_parameters(), "data/vocab_size": datamodule.vocab_size}
        )

    # weights_only: Lightning would otherwise unpickle whatever a checkpoint holds.
    trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
    if trainer.global_step <= start_step and not trainer.interrupted:
        raise ConfigError(
            f"the run trained no step (it stopped at step {trainer.global_step}): check "
            "trainer.limit_train_batches and trainer.max_epochs against trainer.max_steps"
        )
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    metrics["unigram_entropy"] = datamodule.unigram_entropy()
    log.info("final metrics: %s", metrics)
    return FitResult(metrics, task, datamodule, trainer, last_checkpoint.last_model_path, cfg)


def build_logger(cfg: DictConfig, start_step: int):
    """cfg.logger instantiated (False without one); a CSV history continues at `start_step`, a
    wandb run continues the run directory's wandb run when resuming (longctx/train/loggers.py)."""
    if not cfg.get("logger"):
        return False
    chosen = {}
    if issubclass(get_class(cfg.logger._target_), WandbLogger) and not cfg.logger.get("id"):
        chosen["id"] = wandb_run_id(Path(cfg.paths.output_dir), resuming=start_step > 0)
    logger = instantiate(cfg.logger, **chosen)
    if isinstance(logger, ResumableCSVLogger):
        logger.resume_step = start_step
    return logger


def training_flops_per_batch(task: LanguageModelTask, seq_len: int, tokens: int) -> float | None:
    """For Lightning's ThroughputMonitor (MFU, conf/callbacks/throughput.yaml); None when a
    backend does not count its FLOPs."""
    try:
        return training_flops_per_token(task.model, seq_len) * tokens
    except NotImplementedError:
        return None
