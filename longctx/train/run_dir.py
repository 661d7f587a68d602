"""The run directory: held by one run at a time, never reused for another run, tidied on start."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_only

from longctx.core.files import remove_stale_partials
from longctx.errors import ConfigError

log = logging.getLogger(__name__)

# In the run directory: locked by the run that uses it.
RUN_LOCK_FILE = ".run.lock"


@contextmanager
def claim_run_dir(output_dir: Path) -> Iterator[None]:
    """Hold the run directory for this run: a second run started in it meanwhile is refused.

    An advisory lock on a file in the directory, released by the OS when the process ends,
    however it ends, so a killed run never leaves its directory locked. Rank 0 holds it for all
    ranks. Where the filesystem has no locks the run goes on unguarded.
    """
    if os.name != "posix" or rank_zero_only.rank != 0:
        yield
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / RUN_LOCK_FILE, "a+") as handle:
        if _lock(handle, output_dir):
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
            handle.flush()
        yield


def _lock(handle, output_dir: Path) -> bool:
    """Whether this process now holds the lock; a ConfigError when another run does."""
    import fcntl

    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        raise ConfigError(
            f"{output_dir} is in use by another run ({owner}); wait for it to end, or start "
            "this run in a new directory (leave hydra.run.dir unset)"
        ) from None
    except OSError as error:
        log.warning("cannot lock %s (%s): concurrent runs are not detected", output_dir, error)
        return False
    return True


def refuse_another_runs_dir(output_dir: Path, ckpt_path: str | None) -> None:
    """A run never writes over another run's checkpoints: a run directory that already holds
    one is only resumed (ckpt_path=last), never started again or fed another run's checkpoint.

    SLURM's hpc_ckpt_*.ckpt count too: given none, Lightning would resume from one by itself,
    past every check of the resume.
    """
    held = [output_dir / "checkpoints" / "last.ckpt", *sorted(output_dir.glob("hpc_ckpt_*.ckpt"))]
    existing = [path for path in held if path.exists()]
    if not existing:
        return
    if ckpt_path is not None and Path(ckpt_path).resolve().is_relative_to(output_dir.resolve()):
        return
    raise ConfigError(
        f"{output_dir} already holds a run ({existing[0]}); resume it with ckpt_path=last, or "
        "start this run in a new directory (leave hydra.run.dir unset)"
    )


def remove_stale_partial_files(output_dir: Path) -> None:
    """Temporary files of writes killed midway (checkpoints, results), some of them full size.

    Only this run writes in its directory, which it holds: none of them can be in progress.
    """
    if rank_zero_only.rank == 0:
        for folder in (output_dir, output_dir / "checkpoints"):
            for path in remove_stale_partials(folder):
                log.info("removed %s, left by a write that was killed", path)
