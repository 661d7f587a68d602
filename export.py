"""Export a checkpoint as a folder of safetensors weights, config and tokenizer.

python export.py ckpt_path=outputs/train/runs/<run>/checkpoints/last.ckpt out_dir=exported/<name>
"""

import hydra
from omegaconf import DictConfig

from longctx.core.cli import errors_in_one_line, quiet_known_noise
from longctx.pretrained import export_checkpoint


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> None:
    quiet_known_noise()
    with errors_in_one_line():
        directory = export_checkpoint(cfg.ckpt_path, cfg.out_dir)
        print(f"exported {cfg.ckpt_path} to {directory}")


if __name__ == "__main__":
    main()
