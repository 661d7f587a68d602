"""Evaluate a checkpoint, or compare many runs.

python eval.py ckpt_path=outputs/train/runs/<run>/checkpoints/last.ckpt
python eval.py -m ckpt_path=<a>.ckpt,<b>.ckpt                  # one output directory per checkpoint
python eval.py report.runs='outputs/train/multiruns/<time>/*'   # report mode: no checkpoint needed
"""

import hydra
from omegaconf import DictConfig

from longctx.jobs import errors_in_one_line, evaluate, finish_wandb


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    with errors_in_one_line():
        try:
            evaluate(cfg)
        finally:
            finish_wandb()


if __name__ == "__main__":
    main()
