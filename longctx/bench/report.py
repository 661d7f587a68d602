"""The bench's outputs: ratios to SDPA, scaling exponents, and bench.json/.csv/.md/.png."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from longctx.bench.config import BASELINE
from longctx.bench.measure import median
from longctx.bench.worker import MEASUREMENTS

# Identity and settings of a row, then what the worker measures (worker.MEASUREMENTS, except the
# per-call list and the parameter count), then what the parent derives across rows.
CSV_COLUMNS = [
    "subject",
    "kind",
    "label",
    "mode",
    "dtype",
    "seq_len",
    "batch",
    "heads",
    "head_dim",
    "device",
    "status",
    "reason",
    "rounds",
    "cpu_allocator",
    "options",
    "kernel",
    "load",
    *(key for key in MEASUREMENTS if key not in ("times_ms", "parameters")),
    "ratio_vs_sdpa",
]
COUNTED = "launches"  # the mode whose rows are counts, not times: no fits, plots or ratios
MEMORY_MEANING = {
    "decode": "streaming state after N tokens",
    "default": "allocator peak during one call, above what was live before it",
}


def _length_header(lengths: list[int]) -> list[str]:
    """A markdown table's header with one column per sequence length."""
    return [
        "| implementation | " + " | ".join(f"N={_length(n)}" for n in lengths) + " |",
        "|" + "---|" * (len(lengths) + 1),
    ]


def fit_exponent(lengths: list[float], values: list[float]) -> float | None:
    """k of value ~ c * N^k: least squares on log-log over the points (None below two lengths)."""
    points = [(n, v) for n, v in zip(lengths, values) if v is not None and v > 0]
    if len({n for n, _ in points}) < 2:
        return None
    logs_n = np.log([n for n, _ in points])
    logs_v = np.log([v for _, v in points])
    return float(np.polyfit(logs_n, logs_v, 1)[0])


def combine_rounds(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One configuration's row from its rounds (the first decides status and reason).

    time_ms is the median of the rounds' medians, time_ms_min the least call; memory figures
    are the largest seen, faulted_mib the median of the rounds'. `round_times_ms` keeps each
    round's median (None where a later round failed), so ratios can pair rounds; `rounds` counts
    the rounds that measured. Under `load`, time_ms_loaded is the median of the rounds' loaded
    times and `round_times_ms_loaded` keeps each round's, paired with its idle time.
    """
    first = rows[0]
    if first["status"] != "ok":
        return {**first, "round_times_ms": [], "rounds": 0}
    if first["mode"] == COUNTED:
        return {**first, "round_times_ms": [], "rounds": 1}
    measured = [row for row in rows if row["status"] == "ok"]
    time_ms = median([row["time_ms"] for row in measured])
    combined = {
        **first,
        "round_times_ms": [row["time_ms"] if row["status"] == "ok" else None for row in rows],
        "rounds": len(measured),
        "time_ms": time_ms,
        "time_ms_min": min(row["time_ms_min"] for row in measured),
        "times_ms": [t for row in measured for t in row["times_ms"]],
        "wall_s": sum(row["wall_s"] for row in rows),
    }
    for rate in ("tokens_per_s", "gflops_per_s"):  # per second of the combined time
        if first[rate] is not None:
            combined[rate] = first[rate] * first["time_ms"] / time_ms
    for memory in ("memory_mib", "peak_alloc_mib", "peak_rss_mib", "state_mib"):
        figures = [row[memory] for row in measured if row[memory] is not None]
        combined[memory] = max(figures) if figures else None
    faulted = [row["faulted_mib"] for row in measured if row.get("faulted_mib") is not None]
    combined["faulted_mib"] = median(faulted) if faulted else None
    combined["round_times_ms_loaded"] = [
        row.get("time_ms_loaded") if row["status"] == "ok" else None for row in rows
    ]
    loaded = [t for t in combined["round_times_ms_loaded"] if t is not None]
    combined["time_ms_loaded"] = median(loaded) if loaded else None
    return combined


def _same_setting(row: dict[str, Any]) -> tuple:
    """What a row is compared with SDPA at: N, dtype, mode and thread count."""
    return (row["dtype"], row["mode"], row["seq_len"], row.get("threads"))


def _baselines(rows: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    return {_same_setting(r): r for r in rows if r["subject"] == BASELINE and r["status"] == "ok"}


def _paired_median(
    numerators: list[float | None], denominators: list[float | None]
) -> float | None:
    """The median of numerator / denominator over the rounds where both were measured."""
    pairs = [t / b for t, b in zip(numerators, denominators) if t is not None and b is not None]
    return median(pairs) if pairs else None


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """ratio_vs_sdpa: the row's time over SDPA's at the same N, dtype, mode and thread count
    (None if none), as the median over rounds of the two times measured in the same round."""
    baseline = _baselines(rows)
    for row in rows:
        reference = baseline.get(_same_setting(row))
        row["ratio_vs_sdpa"] = None
        if row["status"] != "ok" or reference is None:
            continue
        paired = _paired_median(
            row.get("round_times_ms") or [], reference.get("round_times_ms") or []
        )
        row["ratio_vs_sdpa"] = (
            paired if paired is not None else row["time_ms"] / reference["time_ms"]
        )


def add_slowdowns(rows: list[dict[str, Any]]) -> None:
    """Under `load`: slowdown = loaded time / idle time (the median over rounds of each round's
    pair), and slowdown_vs_sdpa = that slowdown over SDPA's at the same N, dtype, mode and
    thread count: above 1, the competing load costs the row more than it costs SDPA."""
    for row in rows:
        row["slowdown"] = row["slowdown_vs_sdpa"] = None
        if row["status"] == "ok" and row.get("time_ms_loaded") is not None:
            row["slowdown"] = _paired_median(
                row.get("round_times_ms_loaded") or [], row.get("round_times_ms") or []
            )
    baseline = _baselines(rows)
    for row in rows:
        reference = baseline.get(_same_setting(row))
        if row["slowdown"] is not None and reference and reference["slowdown"] is not None:
            row["slowdown_vs_sdpa"] = row["slowdown"] / reference["slowdown"]


def fits(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Time and memory scaling exponents per subject, dtype, mode and thread count."""
    series: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        if row["status"] == "ok" and row["mode"] != COUNTED:
            series[(row["subject"], row["dtype"], row["mode"], row.get("threads"))].append(row)
    return [
        {
            "subject": subject,
            "dtype": dtype,
            "mode": mode,
            "threads": threads,
            "lengths": [r["seq_len"] for r in points],
            "time_exponent": fit_exponent(
                [r["seq_len"] for r in points], [r["time_ms"] for r in points]
            ),
            "memory_exponent": fit_exponent(
                [r["seq_len"] for r in points], [r["memory_mib"] for r in points]
            ),
        }
        for (subject, dtype, mode, threads), points in series.items()
    ]


def write_json(
    path: Path, environment: dict, settings: dict, rows: list, fitted: list, notes: list[str]
) -> None:
    document = {
        "environment": environment,
        "settings": settings,
        "rows": rows,
        "fits": fitted,
        "notes": notes,
    }
    path.write_text(json.dumps(document, indent=2, default=str))


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "options": json.dumps(row.get("options") or {})})


def _length(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _number(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return ""
    if row["status"] != "ok":
        return row["status"]
    unit = "ms/token" if row["mode"] == "decode" else "ms"
    cell = f"{_number(row['time_ms'])} {unit} / {_number(row['memory_mib'])} MiB"
    if row.get("ratio_vs_sdpa") is not None:
        cell += f" ({row['ratio_vs_sdpa']:.2f}x)"
    return cell


def _exponent(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _not_measured(rows: list[dict[str, Any]]) -> list[str]:
    """One line per series that missed lengths:
    the first failure's reason, then the lengths it cut."""
    series: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        if row["status"] != "ok":
            series[(row["subject"], row["mode"], row["dtype"])].append(row)
    lines = []
    for (subject, mode, dtype), missed in series.items():
        first = missed[0]
        line = (
            f"- {subject}, {mode}, {dtype}, N={_length(first['seq_len'])}: "
            f"{first['status']}: {first['reason']}"
        )
        if len(missed) > 1:
            line += "; so not run at N=" + ", ".join(_length(r["seq_len"]) for r in missed[1:])
        lines.append(line)
    return lines


def _faults_table(
    rows: list[dict[str, Any]], mode: str, dtype: str, lengths: list[int], labels: dict[str, str]
) -> list[str]:
    """MiB page-faulted per call for one panel (CPU rows only; nothing when none was counted)."""
    faulted = {
        (r["subject"], r["seq_len"]): r["faulted_mib"]
        for r in rows
        if (r["mode"], r["dtype"]) == (mode, dtype)
        and r["status"] == "ok"
        and r.get("faulted_mib") is not None
    }
    if not faulted:
        return []
    lines = [
        (
            f"MiB page-faulted per call ({mode}, {dtype}; "
            "minor faults x page size, median of the calls):"
        ),
        "",
        *_length_header(lengths),
    ]
    for subject, label in labels.items():
        cells = [_number(faulted[subject, n]) if (subject, n) in faulted else "" for n in lengths]
        lines.append("| " + " | ".join([label] + cells) + " |")
    return lines + [""]


def markdown(
    rows: list[dict[str, Any]], fitted: list[dict], environment: dict, notes: list[str]
) -> str:
    """One README-ready table per (mode, dtype), and per thread count where `threads` was swept:
    rows = subjects, columns = N; under `load`, a second table of the loaded times."""
    lengths = sorted({r["seq_len"] for r in rows})
    swept = len({r.get("threads") for r in rows} - {None}) > 1

    def panel_of(row: dict[str, Any]) -> tuple:
        return (row["mode"], row["dtype"], row.get("threads") if swept else None)

    exponents = {
        (f["subject"], f["mode"], f["dtype"], f.get("threads") if swept else None): f
        for f in fitted
    }
    load = environment.get("load_average_start")
    rounds = max((r.get("rounds") or 0 for r in rows), default=0)
    timing = (
        f"median over {rounds} rounds of each round's median; (1.23x) = the median of the rounds' "
        "time / SDPA's time"
        if rounds > 1
        else "median of the timed runs; (1.23x) = time / SDPA's time"
    )
    lines = [
        f"Measured on {environment['device_name']}, torch {environment['torch']}, "
        f"{_threads(environment['threads'])} threads, B={rows[0]['batch']}, H={rows[0]['heads']}, "
        f"Dh={rows[0]['head_dim']}"
        + (f", cpu_allocator={rows[0]['cpu_allocator']}" if rows[0].get("cpu_allocator") else "")
        + (
            f", transparent huge pages: {environment['transparent_hugepage']}"
            if environment.get("transparent_hugepage")
            else ""
        )
        + f"; {timing} at the same N, dtype, mode and thread count"
        + (f"; 1-minute load average at the start: {load[0]:.1f}" if load else "")
        + ".",
        "",
    ]
    panels = sorted(
        {panel_of(r) for r in rows if r["mode"] != COUNTED}, key=lambda p: (p[0], p[1], p[2] or 0)
    )
    for panel in panels:
        mode, dtype, threads = panel
        shown = [r for r in rows if panel_of(r) == panel]
        by_key = {(r["subject"], r["seq_len"]): r for r in shown}
        title = f"{mode}, {dtype}" + (f", {threads} threads" if swept else "")
        memory = MEMORY_MEANING.get(mode, MEMORY_MEANING["default"])
        lines += [f"### {title}: time / memory ({memory})", ""]
        header = (
            ["implementation"] + [f"N={_length(n)}" for n in lengths] + ["time ~N^k", "memory ~N^k"]
        )
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        labels = {r["subject"]: r["label"] for r in shown}
        for subject, label in labels.items():
            fit = exponents.get((subject, *panel), {})
            cells = [_cell(by_key.get((subject, n))) for n in lengths]
            cells += [_exponent(fit.get("time_exponent")), _exponent(fit.get("memory_exponent"))]
            lines.append("| " + " | ".join([label] + cells) + " |")
        lines.append("")
        lines += _faults_table(shown, mode, dtype, lengths, labels)
        lines += _loaded_table(shown, title, lengths, labels, environment.get("load"))
    lines += _launches_table(rows, lengths)
    not_measured = _not_measured(rows)
    if not_measured:
        lines += ["### Not measured", ""] + not_measured + [""]
    if notes:
        lines += ["### Notes", ""] + [f"- {note}" for note in notes] + [""]
    return "\n".join(lines)


def _threads(threads: int | list[int]) -> str:
    return ", ".join(str(n) for n in threads) if isinstance(threads, list) else str(threads)


def _loaded_table(
    shown: list[dict[str, Any]],
    title: str,
    lengths: list[int],
    labels: dict[str, str],
    load: dict[str, Any] | None,
) -> list[str]:
    """One panel's times under the competing load, next to the idle table above it (nothing
    when no row of the panel was timed under load)."""
    loaded = {
        (r["subject"], r["seq_len"]): r
        for r in shown
        if r["status"] == "ok" and r.get("time_ms_loaded") is not None
    }
    if not loaded:
        return []
    processes = load["processes"] if load else "?"
    lines = [
        (
            f"{title} under load={processes} (competing CPU-bound processes): "
            "loaded time (slowdown = loaded / idle time; x SDPA = that slowdown over SDPA's):"
        ),
        "",
        *_length_header(lengths),
    ]
    unit = "ms/token" if shown[0]["mode"] == "decode" else "ms"
    for subject, label in labels.items():
        cells = []
        for n in lengths:
            row = loaded.get((subject, n))
            if row is None:
                cells.append("")
                continue
            cell = f"{_number(row['time_ms_loaded'])} {unit}"
            if row.get("slowdown") is not None:
                cell += f" ({row['slowdown']:.2f}x"
                if row.get("slowdown_vs_sdpa") is not None:
                    cell += f", {row['slowdown_vs_sdpa']:.2f}x SDPA"
                cell += ")"
            cells.append(cell)
        lines.append("| " + " | ".join([label] + cells) + " |")
    return lines + [""]


def _launches_table(rows: list[dict[str, Any]], lengths: list[int]) -> list[str]:
    """kernel_launches per backend and kernel choice (mode=launches), columns = N."""
    counted = [r for r in rows if r["mode"] == COUNTED]
    if not counted:
        return []
    first = counted[0]
    lines = [
        f"### kernel launches per block training step (B={first['batch']}, "
        f"model_size={first.get('model_size')}, one block, forward + backward)",
        "",
        "aten ops dispatched + Triton kernels launched + FlexAttention's GPU kernels "
        "(longctx/ops/launches.py); host syncs in brackets.",
        "",
    ]
    shown = [n for n in lengths if any(r["seq_len"] == n for r in counted)]
    header = ["backend", "kernel", "dtype"] + [f"N={_length(n)}" for n in shown]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    keys = dict.fromkeys((r["subject"], r["kernel"], r["dtype"]) for r in counted)
    by_key = {(r["subject"], r["kernel"], r["dtype"], r["seq_len"]): r for r in counted}
    for subject, kernel, dtype in keys:
        cells = []
        for n in shown:
            row = by_key.get((subject, kernel, dtype, n))
            if row is None or row["status"] != "ok":
                cells.append("-" if row is None else row["status"])
            else:
                cells.append(f"{row['kernel_launches']} ({row['host_syncs']})")
        lines.append("| " + " | ".join([subject, kernel, dtype] + cells) + " |")
    return lines + [""]


def plot(path: Path, rows: list[dict[str, Any]]) -> None:
    """Log-log time and memory versus N: a row of panels per mode, a time and a memory panel per
    dtype, one line per subject (dashed: SDPA and the anchors)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = [r for r in rows if r["mode"] != COUNTED]
    if not rows:
        return
    modes = sorted({r["mode"] for r in rows})
    dtypes = sorted({r["dtype"] for r in rows})
    figure, axes = plt.subplots(
        len(modes),
        2 * len(dtypes),
        figsize=(4.5 * 2 * len(dtypes), 3.8 * len(modes) + 1),
        squeeze=False,
    )
    swept = len({r.get("threads") for r in rows} - {None}) > 1
    subjects = list(  # one line per subject, and per thread count where `threads` was swept
        dict.fromkeys((r["subject"], r.get("threads") if swept else None) for r in rows)
    )
    colors = plt.get_cmap("tab20")
    for row_index, mode in enumerate(modes):
        for dtype_index, dtype in enumerate(dtypes):
            time_axis, memory_axis = (
                axes[row_index, 2 * dtype_index],
                axes[row_index, 2 * dtype_index + 1],
            )
            for index, (subject, threads) in enumerate(subjects):
                points = sorted(
                    (
                        r
                        for r in rows
                        if (r["subject"], r["mode"], r["dtype"]) == (subject, mode, dtype)
                        and (not swept or r.get("threads") == threads)
                        and r["status"] == "ok"
                    ),
                    key=lambda r: r["seq_len"],
                )
                if not points:
                    continue
                style = {
                    "color": colors(index % 20),
                    "marker": "o",
                    "label": subject if threads is None else f"{subject}, {threads} threads",
                    "linestyle": "-" if points[0]["kind"] == "backend" else "--",
                }
                lengths = [r["seq_len"] for r in points]
                time_axis.plot(lengths, [r["time_ms"] for r in points], **style)
                memory_axis.plot(lengths, [max(r["memory_mib"], 1e-6) for r in points], **style)
            decode = mode == "decode"
            time_axis.set(ylabel="ms per token" if decode else "ms", title=f"{mode}, {dtype}: time")
            memory_axis.set(
                ylabel="state MiB" if decode else "allocator peak MiB",
                title=f"{mode}, {dtype}: memory",
            )
            for axis in (time_axis, memory_axis):
                axis.set(xscale="log", yscale="log", xlabel="sequence length N")
                axis.grid(True, which="both", alpha=0.3)
    labels: dict[str, Any] = {}
    for axis in axes.flat:  # every subject once, even those missing from some panels
        for handle, label in zip(*axis.get_legend_handles_labels()):
            labels.setdefault(label, handle)
    columns = min(8, max(1, len(labels)))
    figure.legend(
        list(labels.values()), list(labels), loc="lower center", ncol=columns, fontsize="small"
    )
    legend_rows = math.ceil(len(labels) / columns)
    figure.tight_layout(rect=(0, min(0.3, 0.12 * legend_rows / len(modes)), 1, 1))
    figure.savefig(path, dpi=100)
    plt.close(figure)
