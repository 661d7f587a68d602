"""Training callbacks: stop on a non-finite loss,
and checkpoint what Lightning does not (RNG, stream state)."""

from __future__ import annotations

import logging
import math
import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from longctx.core.state import map_state

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stopped before applying that step."""


class NonFiniteLossGuard(Callback):
    """Stops the run when the training loss is NaN or inf,
    before the backward pass and the optimizer step.

    Raising before backward keeps the weights in memory as they were, and no checkpoint is
    written after the bad step, so the last checkpoint of `last_checkpoint` stays the last good
    one. Under DDP every rank stops together: a rank that stopped alone would leave the others
    waiting in the gradient all-reduce.
    """

    def __init__(self, last_checkpoint: ModelCheckpoint):
        self.last_checkpoint = last_checkpoint

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        value = float(loss.detach())
        if trainer.strategy.reduce_boolean_decision(math.isfinite(value), all=True):
            return
        what = (
            f"is {value}"
            if not math.isfinite(value)
            else f"is not finite on another rank (here {value:.4g})"
        )
        kept = self.last_checkpoint.last_model_path
        keep = (
            f"the last good checkpoint is {kept}" if kept else "no checkpoint was written before it"
        )
        raise NonFiniteLossError(
            f"the training loss {what} at step {trainer.global_step} "
            f"(epoch {trainer.current_epoch}); "
            f"stopped before applying it, {keep}. Lower optim.lr, raise optim.warmup_steps or use "
            f"trainer.precision=32-true, then resume with ckpt_path=last"
        )


class RandomStateCheckpoint(Callback):
    """Saves the RNG states of torch (CPU and CUDA), numpy and Python, and restores them on resume.

    Lightning checkpoints model, optimizer, scheduler and loop state but not the RNGs, so
    dropout after a resume would draw other masks than the uninterrupted run. Ranks are seeded
    alike and draw alike, so rank 0's states stand for every rank. They are restored when
    training starts: building the model and the trainer in between draws random numbers too.
    """

    def __init__(self):
        self._loaded: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        # numpy's key array travels as a tensor:
        # checkpoints load with torch.load(weights_only=True).
        kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": (
                kind,
                torch.from_numpy(keys.astype(np.int64)),
                position,
                has_gauss,
                cached_gauss,
            ),
            "python": random.getstate(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._loaded is None:
            return
        state, self._loaded = self._loaded, None
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        kind, keys, position, has_gauss, cached_gauss = state["numpy"]
        np.random.set_state(
            (kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gauss)
        )
        random.setstate(state["python"])


class StreamStateCheckpoint(Callback):
    """Checkpoints the stream state (memory carried across batches) of every rank;
    each gets its own back.

    Ranks own different rows of the ordered stream, so their states differ and are gathered
    to rank 0, which writes the checkpoint. A gather is a collective, so it happens where every
    rank arrives together: at the end of each `every_n_train_steps`-th step, just before
    ModelCheckpoint (always the last callback) saves. A checkpoint written anywhere else, e.g.
    by SLURM's SIGUSR1 handler in the middle of a step, carries no stream state, and the
    resumed run starts every row with fresh memory.
    """

    def __init__(self, every_n_train_steps: int):
        self.every_n_train_steps = every_n_train_steps
        self._trainer: pl.Trainer | None = None
        self._gathered: tuple[int, list] | None = None  # (global step, state of each rank)
        self._loaded: dict[str, Any] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        state = getattr(pl_module, "stream_state", None)
        if state is None or trainer.global_step % self.every_n_train_steps:
            return
        local = map_state(lambda t: t.cpu(), state)
        if trainer.world_size == 1:
            self._gathered = (trainer.global_step, [local])
            return
        by_rank: list = [None] * trainer.world_size
        dist.all_gather_object(by_rank, local)
        self._gathered = (trainer.global_step, by_rank)

    def state_dict(self) -> dict[str, Any]:
        if (
            self._trainer is None
            or self._gathered is None
            or self._gathered[0] != self._trainer.global_step
        ):
            return {}
        step, by_rank = self._gathered
        return {"global_step": step, "by_rank": by_rank}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._loaded is None:
            return
        loaded, self._loaded = self._loaded, None
        by_rank = loaded.get("by_rank")
        if not by_rank:
            log.warning(
                "the checkpoint holds no stream state (not written at a checkpoint step): "
                "memory restarts empty"
            )
        elif len(by_rank) != trainer.world_size:
            log.warning(
                "the checkpoint holds the stream state of %d ranks but this run has %d: "
                "the streams are cut into other rows, so memory restarts empty",
                len(by_rank),
                trainer.world_size,
            )
        else:
            pl_module.stream_state = map_state(
                lambda t: t.to(pl_module.device), by_rank[trainer.global_rank]
            )
