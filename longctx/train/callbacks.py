"""Training callbacks: stop on non-finite training, checkpoint what Lightning does not (RNG, stream
state, the checkpoint schema), and keep last.ckpt at the final step."""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.nn.utils import get_total_norm

from longctx.checkpoints import CHECKPOINT_SCHEMA_VERSION, SCHEMA_KEY, non_finite_weights
from longctx.core.state import map_state

log = logging.getLogger(__name__)


class NonFiniteTrainingError(RuntimeError):
    """Training produced NaN or infinity; stopped before any checkpoint of it was written."""


class NonFiniteLossError(NonFiniteTrainingError):
    """The training loss became NaN or infinite; the run stopped before applying that step."""


class NonFiniteStepError(NonFiniteTrainingError):
    """An optimizer step's gradients, or the weights after it, hold NaN or infinity."""


class NonFiniteGuard(Callback):
    """Stops the run when the loss, the gradients or the weights after a step are NaN or inf.

    The loss is checked before the backward pass: raising there keeps the weights in memory as
    they were. Gradients are checked before the optimizer step and the weights after it, in
    one host sync at the end of the batch, before ModelCheckpoint (always the last callback)
    could save them; so no checkpoint ever holds a non-finite state and the last one written
    stays the last good one. It is verified finite before the error names it. Under DDP every
    rank stops together: a rank that stopped alone would leave the others waiting in a
    collective. With a gradient scaler (fp16), infinite gradients are the scaler's business:
    it skips those steps itself.
    """

    def __init__(self, last_checkpoint: ModelCheckpoint):
        self.last_checkpoint = last_checkpoint
        self._gradients_finite: torch.Tensor | None = None

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
        raise NonFiniteLossError(
            f"the training loss {what} at step {trainer.global_step} "
            f"(epoch {trainer.current_epoch}); stopped before applying it, "
            f"{self._last_good_checkpoint()}. {_ADVICE}"
        )

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer
    ) -> None:
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return
        gradients = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if gradients:
            # The largest magnitude: NaN or inf when any entry is, and never an overflow.
            self._gradients_finite = torch.isfinite(get_total_norm(gradients, math.inf))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        gradients_finite, self._gradients_finite = self._gradients_finite, None
        if gradients_finite is None:  # no optimizer step in this batch (gradient accumulation)
            return
        weights_finite = torch.isfinite(get_total_norm(list(pl_module.parameters()), math.inf))
        local = torch.stack([gradients_finite, weights_finite.to(gradients_finite.device)])
        finite = local.all().item()
        if trainer.strategy.reduce_boolean_decision(bool(finite), all=True):
            return
        if not finite:
            what = _non_finite_description(pl_module, gradients_ok=bool(local[0]))
        else:
            what = "gradients or weights are not finite on another rank"
        raise NonFiniteStepError(
            f"{what} after optimizer step {trainer.global_step} (epoch {trainer.current_epoch}); "
            f"stopped before any checkpoint of them was written, "
            f"{self._last_good_checkpoint()}. {_ADVICE}"
        )

    def _last_good_checkpoint(self) -> str:
        kept = self.last_checkpoint.last_model_path
        if not kept:
            return "no checkpoint was written before it"
        if not Path(kept).is_file():  # a sharded (FSDP) checkpoint: a folder of shards
            return f"the last checkpoint is {kept}"
        bad = non_finite_weights(kept)
        if bad:
            return (
                f"but the last checkpoint {kept} holds non-finite weights too ({len(bad)} "
                f"tensors, e.g. {bad[0]}): resume from an earlier checkpoint"
            )
        return f"the last good checkpoint is {kept} (its weights verified finite)"


_ADVICE = (
    "Lower optim.lr, raise optim.warmup_steps or use trainer.precision=32-true, then resume "
    "with ckpt_path=last (these settings may change on resume: docs/resume.md)"
)


def _non_finite_description(pl_module: pl.LightningModule, gradients_ok: bool) -> str:
    """Which tensors are at fault, for the error message (the run is stopping anyway)."""
    named = list(pl_module.named_parameters())
    if gradients_ok:
        what = "weight tensors"
        bad = [n for n, p in named if not bool(torch.isfinite(p).all())]
    else:
        what = "parameter tensors' gradients"
        bad = [n for n, p in named if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
    example = f" (e.g. {bad[0]})" if bad else ""
    return f"{len(bad)} of {len(named)} {what}{example} hold NaN or inf"


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
    rank arrives together: at the end of each `every_n_train_steps`-th step and of the final
    step, just before ModelCheckpoint (always the last callback) saves. A checkpoint written
    anywhere else, e.g. by SLURM's SIGUSR1 handler in the middle of a step, carries no stream
    state, and the resumed run starts every row with fresh memory, saying so. The saved state is
    never empty (Lightning would drop an empty one, and with it that warning).
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
        final_step = trainer.global_step == trainer.max_steps
        if state is None or (trainer.global_step % self.every_n_train_steps and not final_step):
            return
        local = map_state(lambda t: t.cpu(), state)
        if trainer.world_size == 1:
            self._gathered = (trainer.global_step, [local])
            return
        by_rank: list = [None] * trainer.world_size
        dist.all_gather_object(by_rank, local)
        self._gathered = (trainer.global_step, by_rank)

    def state_dict(self) -> dict[str, Any]:
        step = self._trainer.global_step if self._trainer is not None else None
        if self._gathered is None or self._gathered[0] != step:
            return {"global_step": step, "by_rank": []}
        return {"global_step": step, "by_rank": self._gathered[1]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loaded, self._loaded = self._loaded, None
        if not trainer.ckpt_path or not getattr(pl_module, "ordered_stream", False):
            return
        by_rank = (loaded or {}).get("by_rank")
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


class CheckpointSchemaStamp(Callback):
    """Writes the checkpoint schema version into every checkpoint (longctx.checkpoints reads it)."""

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[SCHEMA_KEY] = CHECKPOINT_SCHEMA_VERSION


class FinalStepCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose last.ckpt also holds the final step.

    Lightning saves last.ckpt at every `every_n_train_steps`-th step, so a max_steps that is not
    a multiple of it would leave the last steps out of every checkpoint: lost to eval.py, and a
    requeued finished run would train them again. When training ends normally (never after an
    exception), the final state is saved unless it already is.
    """

    @property
    def state_key(self) -> str:
        # ModelCheckpoint's key, so that checkpoints written before this class restore into it.
        return super().state_key.replace(type(self).__qualname__, "ModelCheckpoint", 1)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            return
        super().on_train_end(trainer, pl_module)
