"""What a run cost to train: tokens per second and peak memory, from its logs or from a bench.json;
and its validation curve against steps, tokens, FLOPs and training time.

Training logs: the run directory's `metrics.jsonl` (longctx/train/metrics_file.py, written
whatever the logger): tokens/s is cumulative tokens over cumulative training seconds at the last
row, memory the largest `peak_memory_mib` (CUDA). Runs made before that file existed fall back
to the CSV logger's metrics.csv (logger=csv): Lightning's ThroughputMonitor logs cumulative
`train/lengths` (tokens) and `train/time` (seconds), and a peak-memory metric is any column whose
name matches MEMORY_COLUMN. Bench: `python -m longctx.bench` rows of the run's backend
(whole-model `train_step` rows when present, else the `fwd_bwd` mixing kernel), at the sequence
length nearest the run's training length.
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
from pathlib import Path
from typing import Any

from longctx.core.metrics_log import METRICS_FILE, read_metrics

MEMORY_COLUMN = re.compile(r"(peak|max).*mem", re.IGNORECASE)
# A CPU run's throughput counts as measured on a shared machine when, at the median logged row,
# the load average exceeds the run's own torch threads by this much: other processes then took
# CPU time from it (a run's threads alone keep the load at about their number).
SHARED_CPU_LOAD = 0.5
BENCH_MODES = ("train_step", "fwd_bwd")


def training_dir(run_dir: Path, results: dict) -> Path:
    """The training run directory: the run itself, or the one whose checkpoint eval.py evaluated."""
    if (run_dir / "checkpoints").is_dir() or not results.get("checkpoint"):
        return run_dir
    return Path(results["checkpoint"]).resolve().parent.parent


def _last(rows: list[dict], column: str) -> float | None:
    values = [float(r[column]) for r in rows if r.get(column) not in (None, "")]
    return values[-1] if values else None


def costs_from_metrics_file(directory: Path) -> dict[str, Any]:
    """Costs from the run directory's metrics.jsonl (empty without one)."""
    path = directory / METRICS_FILE
    rows = [r for r in read_metrics(path) if "loss" in r] if path.is_file() else []
    if not rows:
        return {}
    last = rows[-1]
    cost: dict[str, Any] = {"source": f"training log {METRICS_FILE}"}
    if last.get("tokens") and last.get("train_seconds"):
        cost["tokens_per_s"] = last["tokens"] / last["train_seconds"]
        cost["train_seconds"] = last["train_seconds"]
        cost["train_tokens"] = int(last["tokens"])
    peaks = [r["peak_memory_mib"] for r in rows if r.get("peak_memory_mib") is not None]
    if peaks:
        cost["peak_memory_mib"] = max(peaks)
    other = [
        r["load_average"] - r["threads"]
        for r in rows
        if r.get("load_average") is not None and r.get("threads")
    ]
    if other and not peaks:  # CPU runs (a CUDA run logs its allocator peak)
        cost["other_cpu_load"] = statistics.median(other)
        cost["shared_cpu"] = cost["other_cpu_load"] >= SHARED_CPU_LOAD
    return cost


def training_curve(directory: Path) -> list[dict[str, Any]]:
    """Validation points of the run's metrics.jsonl: step, tokens, flops, train_seconds, val_loss
    (the last row of each step, so a resumed step counts once)."""
    path = directory / METRICS_FILE
    if not path.is_file():
        return []
    by_step = {r["step"]: r for r in read_metrics(path) if r.get("val_loss") is not None}
    keys = ("step", "tokens", "flops", "train_seconds", "val_loss")
    return [{k: by_step[s].get(k) for k in keys} for s in sorted(by_step)]


def costs_from_csv_log(directory: Path) -> dict[str, Any]:
    """Costs from a CSV logger's metrics.csv (runs made before metrics.jsonl existed)."""
    found = sorted(directory.glob("**/metrics.csv"))
    if not found:
        return {}
    with open(found[-1], newline="") as handle:
        rows = list(csv.DictReader(handle))
    cost: dict[str, Any] = {"source": f"training log {found[-1].relative_to(directory)}"}
    tokens, seconds = _last(rows, "train/lengths"), _last(rows, "train/time")
    if tokens and seconds:
        cost["tokens_per_s"] = tokens / seconds
        cost["train_seconds"] = seconds
        cost["train_tokens"] = int(tokens)
    memory_columns = [c for c in (rows[0] if rows else {}) if MEMORY_COLUMN.search(c)]
    peaks = [
        v for c in memory_columns for r in rows if r.get(c) not in (None, "") for v in [float(r[c])]
    ]
    if peaks:
        cost["peak_memory_mib"] = max(peaks)
    return cost


def load_bench(path: str | Path | None) -> list[dict]:
    if not path:
        return []
    return [
        r
        for r in json.loads(Path(path).read_text())["rows"]
        if r.get("status") == "ok" and r.get("kind") == "backend"
    ]


def costs_from_bench(rows: list[dict], attention: str, seq_len: int, dtype: str) -> dict[str, Any]:
    for mode in BENCH_MODES:
        candidates = [
            r
            for r in rows
            if r["subject"] == attention and r["mode"] == mode and r["dtype"] == dtype
        ]
        if candidates:
            best = min(candidates, key=lambda r: abs(math.log(r["seq_len"] / seq_len)))
            return {
                "tokens_per_s": best.get("tokens_per_s"),
                "peak_memory_mib": best.get("memory_mib"),
                "source": f"bench {mode} {dtype} N={best['seq_len']}",
            }
    return {}


def run_costs(
    run_dir: Path, results: dict, bench_rows: list[dict], bench_dtype: str
) -> dict[str, Any]:
    """Training-log figures first; the bench fills what the logs lack
    (each figure says where it came from)."""
    directory = training_dir(run_dir, results)
    logged = costs_from_metrics_file(directory) or costs_from_csv_log(directory)
    bench = costs_from_bench(
        bench_rows, results["attention"], results["train_context_length"], bench_dtype
    )
    cost = {
        k: logged.get(k)
        for k in (
            "tokens_per_s",
            "peak_memory_mib",
            "train_seconds",
            "train_tokens",
            "shared_cpu",
            "other_cpu_load",
        )
    }
    sources = {}
    for key in ("tokens_per_s", "peak_memory_mib"):
        if cost[key] is None and bench.get(key) is not None:
            cost[key] = bench[key]
            sources[key] = bench["source"]
        elif cost[key] is not None:
            sources[key] = logged["source"]
    if sources.get("tokens_per_s") != logged.get("source"):  # the bench's figure, not shared
        cost["shared_cpu"] = cost["other_cpu_load"] = None
    cost["sources"] = sources
    return cost
