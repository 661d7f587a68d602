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
from longctx.train.schedule import warmup_cosine


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
        self.blocks_compiled = False

    def configure_model(self) -> None:
        """Lightning's hook before fit/validate/test: `compile: true` compiles each block."""
        if self.cfg.get("compile") and not self.blocks_compiled:
            self.model.compile_blocks()
            self.blocks_compiled = True

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
        loss = self._loss(self.model(batch["input_ids"]), batch["targets"])
        self.log("val/loss", loss, prog_bar=True, on_epoch=True, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        loss = self.trainer.callback_metrics.get("val/loss")
        if loss is not None:
            self.log("val/ppl", torch.exp(loss), sync_dist=True)

    def _param_groups(self) -> list[dict]:
        """Decay matrices and embeddings only; norms, biases and per-channel gains/decays stay
        free."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        return [
            {
                "params": [p for p in params if p.ndim >= 2],
                "weight_decay": self.cfg["optim"]["weight_decay"],
            },
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]

    def configure_optimizers(self):
        optim = self.cfg["optim"]
        optimizer = torch.optim.AdamW(
            self._param_groups(), lr=optim["lr"], betas=tuple(optim["betas"]), fused=False
        )
        schedule = warmup_cosine(
            optim["warmup_steps"], self.trainer.max_steps, optim["min_lr_ratio"]
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def on_train_start(self) -> None:
        """This run's optimizer settings, also when resuming.

        Restoring a checkpoint puts back the optimizer's lr, betas and weight decay and the
        schedule's base lr as they were; a resumed run applies its own (docs/resume.md). On a
        fresh run this changes nothing.
        """
        optim = self.cfg["optim"]
        optimizer = self.optimizers(use_pl_optimizer=False)
        scheduler = self.lr_schedulers()
        factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
        for group, configured in zip(optimizer.param_groups, self._param_groups()):
            group["weight_decay"] = configured["weight_decay"]
            group["betas"] = tuple(optim["betas"])
            group["initial_lr"] = optim["lr"]
            group["lr"] = optim["lr"] * factor
        scheduler.base_lrs = [optim["lr"]] * len(optimizer.param_groups)
