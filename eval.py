"""Evaluate a checkpoint: `python eval.py ckpt_path=outputs/train/runs/<run>/checkpoints/last.ckpt`."""
import hydra
from omegaconf import DictConfig

from longctx.eval.run import evaluate_checkpoint
from longctx.train.run import finish_wandb


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    try:
        evaluate_checkpoint(cfg)
    finally:
        finish_wandb()


if __name__ == "__main__":
    main()
