"""A plain metrics file in the run directory, whatever the logger: `metrics.jsonl`.

One JSON object per line. Training rows every `trainer.log_every_n_steps` optimizer steps (and
at the last step): `step`, `tokens`, `flops` and `train_seconds` (cumulative since the run's
first step, carried over a resume), `loss` (mean training loss of rank 0's batches since the
previous row), `lr` (or `lr/<group>` per parameter group when the groups differ), `grad_norm`
(total L2 norm of the gradients before clipping; under FSDP, of this rank's shard),
`tokens_per_s` (since the previous row), `peak_memory_mib` (CUDA allocator peak, null on the
CPU), `peak_rss_mib` (the process's peak resident memory), and `load_average` (the machine's
1-minute load average) beside `threads` (this process's torch threads), from which a report
tells a CPU cost measured on a shared machine (longctx/eval/costs.py). Validation rows: `step`,
`val_loss`, `val_ppl` and the same cumulative counters, so that curves can be read at equal
steps, tokens, FLOPs or training time (longctx/eval/costs.py).

`train_seconds` counts wall time between training batches and leaves validation out. Lines
are appended whole (one write each; the reader, longctx/core/metrics_log.py, skips a torn last
line). On resume, rows written
after the checkpoint's step are dropped, and the counters continue from the last kept row.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from longctx.core.files import atomic_write_text
from longctx.core.metrics_log import METRICS_FILE, read_metrics
from longctx.train.optimizer_stats import gradient_norm, learning_rates, logging_step_due

COUNTERS = ("tokens", "flops", "train_seconds")  # cumulative: carried over a resume


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # a platform without a load average
        return None


def _peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB else


class MetricsFile(Callback):
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / METRICS_FILE
        self.totals: dict[str, float | None] = dict.fromkeys(COUNTERS, 0.0)
        self._interval_tokens = 0.0
        self._interval_seconds = 0.0
        self._losses: list[float] = []
        self._step_extras: dict[str, float] = {}
        self._mark = time.monotonic()

    def _append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(row) + "\n")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            kept = []
            if trainer.global_step > 0 and self.path.is_file():
                kept = [
                    r for r in read_metrics(self.path) if r.get("step", 0) <= trainer.global_step
                ]
                if kept:
                    self.totals = {key: kept[-1].get(key) for key in COUNTERS}
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._mark = time.monotonic()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer
    ) -> None:
        if not trainer.is_global_zero or not logging_step_due(trainer, trainer.global_step + 1):
            return
        norm = gradient_norm(pl_module)
        # Read here: the schedulers step right after the optimizer, before on_train_batch_end.
        self._step_extras = {
            **learning_rates(optimizer),
            "grad_norm": None if norm is None else float(norm),
        }

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        now = time.monotonic()
        elapsed, self._mark = now - self._mark, now
        tokens = float(batch["input_ids"].numel() * trainer.world_size)
        flops = getattr(pl_module, "flops_per_batch", None)  # None: a backend that cannot count
        added = {
            "tokens": tokens,
            "flops": None if flops is None else flops * trainer.world_size,
            "train_seconds": elapsed,
        }
        for key, value in added.items():
            total = self.totals[key]
            self.totals[key] = None if total is None or value is None else total + value
        self._interval_tokens += tokens
        self._interval_seconds += elapsed
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            # Lightning hands back the loss divided by the accumulation factor.
            self._losses.append(float(loss) * trainer.accumulate_grad_batches)
        step = trainer.global_step
        if not (trainer.is_global_zero and self._step_extras and logging_step_due(trainer, step)):
            return
        row = {
            "step": step,
            **self._counters(),
            "loss": sum(self._losses) / len(self._losses) if self._losses else None,
            **self._step_extras,
            "tokens_per_s": self._interval_tokens / self._interval_seconds
            if self._interval_seconds > 0
            else None,
            "peak_memory_mib": torch.cuda.max_memory_allocated(pl_module.device) / 2**20
            if pl_module.device.type == "cuda"
            else None,
            "peak_rss_mib": _peak_rss_mib(),
            "load_average": _load_average(),
            "threads": torch.get_num_threads(),
        }
        self._append(row)
        self._losses, self._step_extras = [], {}
        self._interval_tokens = self._interval_seconds = 0.0

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self._mark = time.monotonic()  # validation is not training time
        loss = trainer.callback_metrics.get("val/loss")
        if not trainer.is_global_zero or loss is None:
            return
        value = float(loss)
        self._append(
            {
                "step": trainer.global_step,
                **self._counters(),
                "val_loss": value,
                "val_ppl": math.exp(min(value, 700.0)),
            }
        )

    def _counters(self) -> dict[str, Any]:
        seconds = self.totals["train_seconds"]
        return {
            "tokens": int(self.totals["tokens"] or 0),
            "flops": self.totals["flops"],
            "train_seconds": None if seconds is None else round(seconds, 3),
        }
