"""CSV logging that keeps a run's history across resumes (`logger=csv`)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from longctx.core.files import atomic_write_text


class ResumableCSVLogger(CSVLogger):
    """Lightning's CSVLogger, except that a resumed run appends to the history it continues.

    Lightning's writer deletes metrics.csv whenever its folder is not empty, so a resume lost
    every row logged before it. This one keeps the rows of the steps before `resume_step` (set
    by the run before anything is logged) and drops later ones: they were logged by steps the
    checkpoint does not hold, which the resumed run trains and logs again. It also writes its
    rows out with every checkpoint, so the history a checkpoint covers is on disk with it.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.resume_step = 0

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = HistoryKeepingWriter(self.log_dir, self.resume_step)
        return self._experiment

    @rank_zero_only
    def after_save_checkpoint(self, checkpoint_callback) -> None:
        self.save()


class HistoryKeepingWriter(ExperimentWriter):
    """ExperimentWriter that trims an existing metrics.csv to the steps before `keep_before`
    and appends to it, instead of deleting it."""

    def __init__(self, log_dir: str, keep_before: int):
        self.keep_before = keep_before
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:  # called by the base class instead of deleting
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            fields = list(reader.fieldnames or [])
        if not fields:
            path.unlink()
            return
        kept = [row for row in rows if _step(row) < self.keep_before]
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=fields)
        writer.writeheader()
        writer.writerows(kept)
        atomic_write_text(path, text.getvalue())
        self.metrics_keys = fields


def _step(row: dict) -> float:
    try:
        return float(row.get("step") or 0)
    except ValueError:
        return 0.0
