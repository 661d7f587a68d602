"""One process at a time: an exclusive lock on a file, held across processes and nodes.

flock(2) locks are released by the kernel when their holder exits or is killed, so a crashed
process never leaves the others waiting. Across nodes they need a shared file system that
supports them (NFS does; Lustre only when mounted with `flock`); where it does not, the lock is
skipped with a warning, and `python -m longctx.data.prepare` run once beforehand prepares the
data instead (docs/cluster.md).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: a single machine, where one run prepares its data alone
    fcntl = None

log = logging.getLogger(__name__)


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing) for the `with` block."""
    if fcntl is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        locked = _lock(handle, path)
        try:
            yield
        finally:
            if locked:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _lock(handle, path: Path) -> bool:
    """Wait for the lock; False (with a warning) where the file system has no locks."""
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is preparing the same data (lock %s): waiting for it", path)
            fcntl.flock(handle, fcntl.LOCK_EX)
    except OSError as error:
        log.warning(
            "cannot lock %s (%s): processes sharing this cache may prepare the same data at once; "
            "run `python -m longctx.data.prepare` with the run's data settings first",
            path,
            error,
        )
        return False
    return True
