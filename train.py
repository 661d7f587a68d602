"""Train a decoder LM with the chosen attention backend: `python train.py attention=<name> ...`."""

import hydra
from omegaconf import DictConfig

from longctx.jobs import (
    errors_in_one_line,
    finish_wandb,
    set_matmul_precision,
    sweep_objective,
    train,
)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    """The number a Hydra sweeper minimises: the last validation loss, else the last training
    loss (longctx.jobs.sweep_objective)."""
    with errors_in_one_line():
        set_matmul_precision()
        try:
            metrics = train(cfg)
        finally:
            finish_wandb()
    return sweep_objective(metrics)


if __name__ == "__main__":
    main()
