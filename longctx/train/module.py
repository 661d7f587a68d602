"""The LightningModule: a LanguageModel, its loss, AdamW with warmup + cosine, and stream state."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf

from longctx.checkpoints import TOKENIZER_KEY
from longctx.model import build_model
from longctx.model.lm import carry_over
from longctx.train.schedule import warmup_cosine
from longctx.train.sharding import fully_shard_model, is_sharded


class LanguageModelTask(pl.LightningModule):
    """Trains `build_model(cfg, vocab_size)` on next-token prediction.

    The whole composed config is saved as hyper-parameters, so a checkpoint alone rebuilds the
    model (eval.py, resume). Backends that declare `ordered_stream` train on ordered streams
    and carry their streaming state (detached, compact) from one batch to the next; the
    StreamStateCheckpoint callback saves it with the checkpoints and restores it on resume.
    Both kinds of step call the LanguageModel itself (its forward), never a method beside it,
    so that sharding wrappers (FSDP) gather its parameters; the loss is computed there in
    chunks (longctx.model.loss).
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
        # Set once the data is ready (longctx/train/run.py); saved with every checkpoint.
        self.tokenizer_state: dict[str, str] | None = None

    @property
    def ordered_stream(self) -> bool:
        return self.model.backend.ordered_stream

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.tokenizer_state is not None:
            checkpoint[TOKENIZER_KEY] = self.tokenizer_state

    def configure_model(self) -> None:
        """Lightning's hook before fit/validate/test.

        `compile: true` compiles each block (regional compilation); then, under trainer=fsdp2
        (a device mesh exists), one FSDP2 unit per block and one for the rest.
        """
        if self.cfg.get("compile") and not self.blocks_compiled:
            self.model.compile_blocks()
            self.blocks_compiled = True
        if self.device_mesh is not None and not is_sharded(self.model):
            fully_shard_model(self.model, self.device_mesh["data_parallel"])

    def training_loss(self, batch: dict) -> torch.Tensor:
        """The mean next-token loss of a training batch; ordered streams carry their state on."""
        if not self.ordered_stream:
            return self.model(batch["input_ids"], targets=batch["targets"])
        reset = batch.get("reset")
        if self.stream_state is None:  # the first batch: every row starts fresh
            reset = torch.ones(batch["input_ids"].shape[0], dtype=torch.bool)
        loss, state = self.model(
            batch["input_ids"], self.stream_state, targets=batch["targets"], reset=reset
        )
        self.stream_state = carry_over(state)
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.training_loss(batch)
        # Averaged over DDP ranks (equal batches), so the logged value is the global batch's loss.
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, sync_dist=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, accuracy = self.model(batch["input_ids"], targets=batch["targets"], accuracy=True)
        self.log("val/loss", loss, prog_bar=True, on_epoch=True, sync_dist=True)
        # Greedy next-token accuracy over the scored targets (-100 = unscored, as in the loss):
        # on data=mqar the answers alone, what early stopping on recall watches.
        self.log("val/accuracy", accuracy, on_epoch=True, sync_dist=True)

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
            self._param_groups(),
            lr=optim["lr"],
            betas=tuple(optim["betas"]),
            **adamw_kernel({p.device.type for p in self.model.parameters()}),
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


def adamw_kernel(device_types: set[str]) -> dict[str, bool]:
    """AdamW's implementation: the fused kernel (one launch for all parameters) on CUDA.

    Elsewhere the default per-parameter loop, which the CPU results of the tests were
    produced with.
    """
    return {"fused": device_types == {"cuda"}}
