"""The run directory's plain metrics file: its name and its reader.

Training writes it (longctx/train/metrics_file.py) and the report reads it
(longctx/eval/costs.py); training and evaluation never import each other, so the format's one
shared piece lives here. One JSON object per line, appended whole; a reader skips a line that
does not parse (the torn last write of a killed run).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows
