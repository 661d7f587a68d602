"""Which configurations to skip: predicted from the shorter lengths of the same series.

A series (subject, dtype, mode) is measured at increasing N. Its next point is predicted by
extrapolating the last two measured points on a log-log line, and it is skipped, with the reason
recorded, when the prediction exceeds the per-configuration time budget or the memory cap, when a
shorter length already failed, or when the total budget is spent. From a single point the
prediction is the lower bound N^1 (no mixing costs less than linear), so a series is cut only when
it surely will not fit; the worker's hard timeout bounds a quadratic surprise.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from typing import Any

from longctx.bench.config import Config
from longctx.bench.measure import MIB

ONE_POINT_EXPONENT = 1.0  # with one measured point: the least any mixing costs
TIME_EXPONENT_RANGE = (1.0, 3.0)  # work never shrinks with N; clamp noise at small N
MEMORY_EXPONENT_RANGE = (0.0, 3.0)


def extrapolate(
    points: list[tuple[int, float]], seq_len: int, exponent_range: tuple[float, float]
) -> float:
    """Value at seq_len from the last two (N, value) points on a log-log line."""
    (n1, y1) = points[-1]
    exponent = ONE_POINT_EXPONENT
    if len(points) >= 2:
        n0, y0 = points[-2]
        if y0 > 0 and y1 > 0 and n1 != n0:
            exponent = math.log(y1 / y0) / math.log(n1 / n0)
    exponent = min(max(exponent, exponent_range[0]), exponent_range[1])
    return y1 * (seq_len / n1) ** exponent


def row_memory_bytes(row: dict[str, Any]) -> float:
    """The most memory a row is known to have used (allocator peak, RSS growth or state)."""
    figures = [row.get(key) for key in ("peak_alloc_mib", "peak_rss_mib", "state_mib")]
    return max((f for f in figures if f is not None), default=0.0) * MIB


class Planner:
    def __init__(self, config_budget_s: float, total_budget_s: float, memory_cap_mib: float | None):
        self.config_budget_s = config_budget_s
        self.total_budget_s = total_budget_s
        self.memory_cap_mib = memory_cap_mib
        self.started = time.monotonic()
        self.history: dict[tuple, list[dict[str, Any]]] = defaultdict(list)

    def record(self, config: Config, row: dict[str, Any]) -> None:
        self.history[config.series].append(row)

    def budget_spent(self) -> str | None:
        """Why nothing more may run (the total budget is spent), or None."""
        elapsed = time.monotonic() - self.started
        if elapsed > self.total_budget_s:
            return f"total_budget_s={self.total_budget_s:g} spent ({elapsed:.0f} s elapsed)"
        return None

    def skip_reason(self, config: Config) -> str | None:
        spent = self.budget_spent()
        if spent:
            return spent
        earlier = [row for row in self.history[config.series] if row["seq_len"] < config.seq_len]
        if not earlier:
            return None
        failed = [row for row in earlier if row["status"] != "ok"]
        if failed:  # cite the root cause, not the chain of skips it caused
            return f"N={failed[0]['seq_len']} was {failed[0]['status']} ({failed[0]['reason']})"
        last = earlier[-1]
        walls = [(row["seq_len"], row["wall_s"]) for row in earlier]
        predicted_s = extrapolate(walls, config.seq_len, TIME_EXPONENT_RANGE)
        if predicted_s > self.config_budget_s:
            return (
                f"predicted {predicted_s:.0f} s from N={last['seq_len']} "
                f"({last['wall_s']:.1f} s) > config_budget_s={self.config_budget_s:g}"
            )
        if self.memory_cap_mib:
            memory = [(row["seq_len"], row_memory_bytes(row)) for row in earlier]
            predicted_mib = extrapolate(memory, config.seq_len, MEMORY_EXPONENT_RANGE) / MIB
            if predicted_mib > self.memory_cap_mib:
                return f"predicted {predicted_mib:.0f} MiB > memory_cap_mib={self.memory_cap_mib:g}"
        return None
