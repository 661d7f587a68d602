"""`python -m longctx.data.prepare [train.py's overrides]`: a run's data, prepared ahead.

Downloads the corpus (where it comes from the hub), trains the tokenizer and writes the token
caches that `python train.py` with the same overrides reads, then exits: for a cluster, run it
once on a CPU node (or the login node) before the GPU job, so no GPU waits for tokenisation and
nothing depends on the ranks' file locking. Only the data settings matter (data, tokenizer,
data.cache_dir, paths); the rest of the overrides are accepted and ignored, so the training
command line can be reused as it is.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from longctx.data.datamodule import build_datamodule

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
log = logging.getLogger("longctx.data.prepare")


def prepare(overrides: list[str]) -> Path:
    """Prepare the data of `python train.py <overrides>`; returns its token cache folder.

    conf/paths' `${project_root:}` resolves because importing this module ran longctx's
    __init__, which registers it.
    """
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    datamodule = build_datamodule(cfg, ordered_stream=False)
    datamodule.prepare_data()
    return datamodule.token_cache


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cache = prepare(sys.argv[1:])
    log.info("token cache ready: %s", cache)


if __name__ == "__main__":
    main()
