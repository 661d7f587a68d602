"""The training progress bar: optimizer steps out of trainer.max_steps, with tokens/s.

Lightning's bar counts the batches of the current epoch and shows batches per second, the
logger's version (`v_num`) and, on a resume, restarts from zero against the epoch's length, so
its total and ETA no longer describe the run. This one counts the run's optimizer steps from
the step it started at (a resume starts at the checkpoint's step, so the ETA covers what is
left), shows tokens per second over every rank since this process started training, and leaves
the version out. With trainer.max_steps unset (-1: training by epochs) it counts batches per
epoch as Lightning's does, still with tokens/s.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

TOKENS_PER_S = "tokens/s"


class TokensProgressBar(TQDMProgressBar):
    BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"

    def __init__(self, refresh_rate: int = 1):
        super().__init__(refresh_rate=refresh_rate)
        self._tokens = 0
        self._counts_steps = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._tokens = 0
        self._counts_steps = trainer.max_steps > 0
        if self._counts_steps:
            bar = self.train_progress_bar
            bar.reset(total=trainer.max_steps)
            bar.initial = bar.n = trainer.global_step
            bar.set_description("Training")

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if not self._counts_steps:  # one bar per epoch, as Lightning's
            super().on_train_epoch_start(trainer, *args)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        self._tokens += int(batch["input_ids"].numel()) * trainer.world_size
        if not self._counts_steps:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        bar = self.train_progress_bar
        if self._should_update(trainer.global_step, bar.total) and not bar.disable:
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        rate = self._tokens_per_s()
        return {TOKENS_PER_S: rate, **items} if rate is not None else items

    def _tokens_per_s(self) -> str | None:
        bar = self._train_progress_bar
        elapsed = bar.format_dict.get("elapsed") if bar is not None else None
        if not self._tokens or not elapsed:
            return None
        return Tqdm.format_sizeof(self._tokens / elapsed)
