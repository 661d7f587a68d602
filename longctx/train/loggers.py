"""The wandb logger as longctx runs it: one wandb run per training run, resumes included.

A run's wandb id is kept in its directory (`wandb_run_id`), so a resume (`hydra.run.dir=<run>
ckpt_path=last`, docs/resume.md) continues the same wandb run instead of splitting its history
in two. Offline runs write one `wandb/offline-run-*-<id>` folder per process; `wandb sync`
uploads them into that one run.
"""

from __future__ import annotations

import secrets
import string
from pathlib import Path

from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import WandbLogger

from longctx.core.files import atomic_write_text

RUN_ID_FILE = "wandb_run_id"
_ID_ALPHABET = string.ascii_lowercase + string.digits


class WandbRunLogger(WandbLogger):
    """Lightning's WandbLogger without the `anonymous=None` it always passes to `wandb.init`
    (wandb warns on every run that the setting has no effect)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)


def wandb_run_id(run_dir: Path, resuming: bool) -> str | None:
    """The wandb id of the run in `run_dir`: the kept one when resuming, else a new one, kept.

    None on ranks other than zero, which never start a wandb run (and must not race rank zero
    to the file).
    """
    if rank_zero_only.rank != 0:
        return None
    kept = Path(run_dir) / RUN_ID_FILE
    if resuming and kept.is_file() and kept.read_text().strip():
        return kept.read_text().strip()
    run_id = "".join(secrets.choice(_ID_ALPHABET) for _ in range(8))  # wandb's own id form
    atomic_write_text(kept, run_id + "\n")
    return run_id
