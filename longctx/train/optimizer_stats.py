"""The learning rate and the gradient norm of an optimizer step, for the Lightning loggers and
the metrics file (longctx/train/metrics_file.py), which both read them from here."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback


def learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """`lr` when every parameter group has the same rate (longctx's groups differ only in weight
    decay), else `lr/<group>` per group."""
    rates = [float(group["lr"]) for group in optimizer.param_groups]
    if len(set(rates)) == 1:
        return {"lr": rates[0]}
    return {f"lr/{i}": rate for i, rate in enumerate(rates)}


def gradient_norm(module: torch.nn.Module) -> torch.Tensor | None:
    """Total L2 norm of the gradients, before clipping (under FSDP: of this rank's shard)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return None
    return torch.stack([g.detach().float().norm() for g in grads]).norm()


def logging_step_due(trainer: pl.Trainer, step: int) -> bool:
    """Whether optimizer step `step` is one the logs record (every log_every_n_steps, and the
    last)."""
    every = max(int(trainer.log_every_n_steps), 1)
    return step % every == 0 or (trainer.max_steps > 0 and step >= trainer.max_steps)


class OptimizerStats(Callback):
    """Logs `train/lr` (or `train/lr/<group>` for groups that differ) and `train/grad_norm` to
    the run's loggers, on the steps they record: the values metrics.jsonl holds."""

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer
    ) -> None:
        if not logging_step_due(trainer, trainer.global_step + 1):
            return
        # Read before the step: the schedulers step right after the optimizer.
        for name, rate in learning_rates(optimizer).items():
            pl_module.log(f"train/{name}", rate, on_step=True, on_epoch=False)
        norm = gradient_norm(pl_module)
        if norm is not None:
            pl_module.log("train/grad_norm", norm, on_step=True, on_epoch=False)
