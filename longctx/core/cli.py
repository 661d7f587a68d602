"""What every entry point (train.py, eval.py, generate.py, export.py, the bench) does alike:
report a failure the user can fix as one line, and keep known noise off the console."""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from longctx.errors import ConfigError

# Warnings and log lines every run printed that say nothing about the run: Lightning's tips
# advertising its cloud products; the deprecation Lightning's own pytree helper triggers in
# torch (nothing the user can change; it goes when Lightning updates the helper); and, on every
# resume, that the run's checkpoint folder is not empty (a run never writes into another run's
# folder: longctx/train/run_dir.py refuses that before training).
_NOISY_WARNINGS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"Checkpoint directory .* exists and is not empty",
)
_NOISY_LOG_LINES = re.compile(r"^💡 Tip: ")
# The loggers Lightning's rank-zero info goes through (tips included).
_LIGHTNING_INFO_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
)


class _DropNoisyLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _NOISY_LOG_LINES.match(str(record.msg))


def quiet_known_noise() -> None:
    """Filter the known noisy warnings and log lines (idempotent; other warnings stay)."""
    for message in _NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    for name in _LIGHTNING_INFO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoisyLines) for f in logger.filters):
            logger.addFilter(_DropNoisyLines())


@contextmanager
def errors_in_one_line(
    errors: tuple[type[BaseException], ...] = (ConfigError,),
    on_config_error: Callable[[], None] | None = None,
) -> Iterator[None]:
    """A failure of one of `errors` is printed as one line (`error: ...`) and the process exits
    with status 1; HYDRA_FULL_ERROR=1 shows the traceback instead. `on_config_error` runs first
    for a ConfigError (e.g. removing a run directory nothing was written to)."""
    try:
        yield
    except errors as error:
        if isinstance(error, ConfigError) and on_config_error is not None:
            on_config_error()
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        raise SystemExit(1) from None
