"""The LightningModule: a LanguageModel, its loss, AdamW with warmup + cosine, and stream state."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn import functional as F

from longctx.core.state import detach_state, reset_rows
from longctx.model import build_model


class LanguageModelTask(pl.LightningModule):
    """Trains `build_model(cfg, vocab_size)` on next-token prediction.

    The whole composed config is saved as hyper-parameters, so a checkpoint alone rebuilds the
    model (eval.py, resume). Backends that declare `ordered_stream` train on ordered streams
    and carry their streaming state (detached) from one batch to the next; the
    StreamStateCheckpoint callback saves it with the checkpoints and restores it on resume.
    """

    def __init__(self, cfg: Mapping[str, Any], vocab_size: int):
        super().__init__()
        if isinstance(cfg, DictConfig):
            # The `hydra` node (present when composed in tests) is runtime state,
            # not the run's recipe.
            cfg = OmegaConf.to_container(
                OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True
            )
        self.save_hyperparameters({"cfg": cfg, "vocab_size": vocab_size})
        self.cfg = cfg
        self.model = build_model(cfg, vocab_size)
        self.stream_state = None

    @property
    def ordered_stream(self) -> bool:
        return self.model.backend.ordered_stream

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.ordered_stream:
            state = self.stream_state
            if state is None:
                state = self.model.init_state(batch["input_ids"].shape[0])
            if "reset" in batch:
                state = reset_rows(
                    state, self.model.init_state(batch["input_ids"].shape[0]), batch["reset"]
                )
            logits, state = self.model.step(batch["input_ids"], state)
            self.stream_state = detach_state(state)
        else:
            logits = self.model(batch["input_ids"])
        loss = self._loss(logits, batch["targets"])
        # Averaged over DDP ranks (equal batches), so the logged value is the global batch's loss.
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, sync_dist=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits, targets = self.model(batch["input_ids"]), batch["targets"]
        loss = self._loss(logits, targets)
        self.log("val/loss", loss, prog_bar=True, on_epoch=True, sync_dist=True)
        # Greedy next-token accuracy over the scored targets (-100 = unscored, as in the loss):
        # on data=mqar the answers alone, what early stopping on recall watches.
        scored = targets != -100
        correct = (logits.argmax(dim=-1)[scored] == targets[scored]).float()
        self.log(
            "val/accuracy", correct.mean(), on_epoch=True, sync_dist=True, batch_size=len(correct)
        )

    def on_validation_epoch_end(self) -> None:
        loss = self.trainer.callback_metrics.get("val/loss")
        if loss is not None:
            self.log("val/ppl", torch.exp(loss), sync_dist=True)

    def configure_optimizers(self):
        optim = self.cfg["optim"]
        # Decay matrices and embeddings only; norms, biases and per-channel gains/decays stay free.
        decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": optim["weight_decay"]},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=optim["lr"],
            betas=tuple(optim["betas"]),
            fused=False,
        )
        total = max(int(self.trainer.max_steps), 1)
        warmup = min(int(optim["warmup_steps"]), total - 1)
        schedulers = [
            torch.optim.lr_scheduler.CosineAnnealingLR(
                optimizer, T_max=max(total - warmup, 1), eta_min=optim["lr"] * optim["min_lr_ratio"]
            )
        ]
        if warmup > 0:
            schedulers.insert(
                0, torch.optim.lr_scheduler.LinearLR(optimizer, 1.0 / warmup, 1.0, warmup)
            )
        scheduler = (
            schedulers[0]
            if len(schedulers) == 1
            else torch.optim.lr_scheduler.SequentialLR(optimizer, schedulers, milestones=[warmup])
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
