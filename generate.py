"""Stream text from a trained checkpoint.

python generate.py ckpt_path=outputs/train/runs/<run>/checkpoints/last.ckpt prompt="To be"
"""

import sys

import hydra
from omegaconf import DictConfig

from longctx.core.cli import errors_in_one_line, quiet_known_noise
from longctx.generation import generate_text


@hydra.main(version_base="1.3", config_path="conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    quiet_known_noise()
    with errors_in_one_line():
        for piece in generate_text(cfg):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")


if __name__ == "__main__":
    main()
