"""Report mode for data=mqar runs: recall accuracy by setting, by query distance, and against the
streaming state size (the recall-versus-state frontier of Based, Arora et al. 2024).

A cell is one arm (the attention backend with its options) at one width (model.d_model). Its
runs differ in learning rate and seed. As in Zoology, each cell is reported at its best learning
rate; here the best is chosen on the validation split (fresh examples of the training settings),
never on the test split whose numbers are shown. Every accuracy comes with a 95% interval: a
single run's from its evaluation (a bootstrap over test examples, longctx/eval/mqar.py); with
several seeds at the best rate, the table shows their mean, standard deviation and the t interval
of the mean over seeds (the seeds are then the units: they vary more than the examples do).
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from longctx.core.files import atomic_write_text  # noqa: E402
from longctx.eval.costs import training_dir  # noqa: E402
from longctx.eval.outputs import csv_text  # noqa: E402
from longctx.eval.stats import student_t_quantile  # noqa: E402

ARM_OPTIONS_IGNORED = ("name", "kernel")  # how a backend runs, not what it computes
MARKERS = {64: "o", 128: "s"}  # by width; other widths get triangles


@dataclass
class MQARRun:
    """One run's numbers, as the report needs them."""

    path: Path
    arm: str
    width: int
    lr: float | None
    seed: int | None
    validation: dict  # (seq_len, num_pairs) -> accuracy
    test: dict  # (seq_len, num_pairs) -> accuracy
    test_interval: dict  # (seq_len, num_pairs) -> (low, high), or None where not recorded
    by_distance: dict  # (distance_start, distance_end) -> (correct, answers), test settings pooled
    state_bytes: dict  # length -> peak bytes per sequence while decoding that many tokens
    steps: int | None
    steps_to_99: int | None
    train_seconds: float | None

    @property
    def mean_validation(self) -> float:
        return float(np.mean(list(self.validation.values()))) if self.validation else -1.0


def arm_name(results: dict) -> str:
    """`sliding_window (window=16)`: the backend and the options that define what it computes."""
    options = {
        k: v
        for k, v in results.get("attention_options", {}).items()
        if k not in ARM_OPTIONS_IGNORED
    }
    if not options:
        return results["attention"]
    text = ", ".join(
        f"{k}={json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v}"
        for k, v in sorted(options.items())
    )
    return f"{results['attention']} ({text})"


def _training_log(run_dir: Path, results: dict) -> tuple[int | None, int | None]:
    """(steps trained, first validated step with accuracy > 0.99) from the CSV training log."""
    found = sorted(training_dir(run_dir, results).glob("**/metrics.csv"))
    if not found:
        return None, None
    with open(found[-1], newline="") as handle:
        rows = list(csv.DictReader(handle))
    steps = [int(r["step"]) for r in rows if r.get("step")]
    passed = [
        int(r["step"])
        for r in rows
        if r.get("val/accuracy") not in (None, "") and float(r["val/accuracy"]) > 0.99
    ]
    return (max(steps) + 1 if steps else None), (min(passed) + 1 if passed else None)


def mqar_run(run) -> MQARRun:
    """From a report Run (results.json of a data=mqar evaluation, its cost and directory)."""
    r = run.results
    accuracy, interval = defaultdict(dict), {}
    for row in r["mqar"]:
        if row.get("accuracy") is not None:
            setting = (row["seq_len"], row["num_pairs"])
            accuracy[row["split"]][setting] = row["accuracy"]
            if row["split"] == "test" and row.get("accuracy_low") is not None:
                interval[setting] = (row["accuracy_low"], row["accuracy_high"])
    pooled = defaultdict(lambda: [0, 0])
    for row in r.get("mqar_distance", []):
        bucket = pooled[(row["distance_start"], row["distance_end"])]
        bucket[0] += row["correct"]
        bucket[1] += row["answers"]
    steps, steps_to_99 = _training_log(run.path, r)
    return MQARRun(
        path=run.path,
        arm=arm_name(r),
        width=int(r["model"]["d_model"]),
        lr=r.get("train", {}).get("lr"),
        seed=r.get("train", {}).get("seed"),
        validation=dict(accuracy["validation"]),
        test=dict(accuracy["test"]),
        test_interval=interval,
        by_distance={k: tuple(v) for k, v in pooled.items()},
        state_bytes={row["length"]: row["peak_bytes"] for row in r.get("state_size", [])},
        steps=steps,
        steps_to_99=steps_to_99,
        train_seconds=run.cost.get("train_seconds"),
    )


@dataclass
class Cell:
    """An (arm, width) at its best learning rate: the runs (seeds) at that rate, and every rate."""

    arm: str
    width: int
    lr: float | None
    runs: list[MQARRun]
    rates: dict  # lr -> mean validation accuracy over that rate's runs

    def test_accuracy(self, setting) -> tuple[float | None, float | None]:
        values = [run.test[setting] for run in self.runs if setting in run.test]
        if not values:
            return None, None
        return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)

    def test_interval(self, setting, confidence: float = 0.95) -> tuple[float, float] | None:
        """One run: its evaluation's interval. Several seeds: mean +- t * sd / sqrt(seeds)."""
        values = [run.test[setting] for run in self.runs if setting in run.test]
        if len(values) == 1:
            return next(run.test_interval.get(setting) for run in self.runs if setting in run.test)
        if len(values) < 2:
            return None
        half = student_t_quantile(0.5 + confidence / 2, len(values) - 1) * float(
            np.std(values, ddof=1) / np.sqrt(len(values))
        )
        mean = float(np.mean(values))
        return max(0.0, mean - half), min(1.0, mean + half)

    def state_bytes(self, length: int) -> int | None:
        sizes = {run.state_bytes.get(length) for run in self.runs} - {None}
        return sizes.pop() if len(sizes) == 1 else None


def best_cells(runs: list[MQARRun]) -> list[Cell]:
    """One Cell per (arm, width): the learning rate with the best mean validation accuracy."""
    by_cell = defaultdict(lambda: defaultdict(list))
    for run in runs:
        by_cell[(run.arm, run.width)][run.lr].append(run)
    cells = []
    for (arm, width), by_lr in by_cell.items():
        rates = {lr: float(np.mean([r.mean_validation for r in rs])) for lr, rs in by_lr.items()}
        best = max(rates, key=lambda lr: (rates[lr], len(by_lr[lr])))
        cells.append(Cell(arm, width, best, sorted(by_lr[best], key=lambda r: r.seed or 0), rates))
    return sorted(cells, key=lambda c: (c.arm, c.width))


def _settings(cells: list[Cell]) -> list[tuple[int, int]]:
    return sorted({s for cell in cells for run in cell.runs for s in run.test})


def _pct(mean: float | None, spread: float | None = None, interval=None) -> str:
    if mean is None:
        return "–"
    text = f"{100 * mean:.1f}" + (f" ± {100 * spread:.1f}" if spread is not None else "")
    return text + (f" [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]" if interval else "")


def _bytes(value: int | None) -> str:
    if value is None:
        return "–"
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value} B"


def accuracy_table(cells: list[Cell]) -> list[str]:
    settings = _settings(cells)
    longest = max((s[0] for s in settings), default=None)
    head = (
        ["arm", "d_model", "best lr", "seeds"]
        + [f"L={n} pairs={p}" for n, p in settings]
        + [f"state @{longest}", "steps", "steps to 99% val", "train s"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cell in cells:
        steps = [r.steps for r in cell.runs if r.steps]
        reached = [r.steps_to_99 for r in cell.runs if r.steps_to_99]
        seconds = [r.train_seconds for r in cell.runs if r.train_seconds]
        cells_text = [
            cell.arm,
            str(cell.width),
            f"{cell.lr:g}" if cell.lr is not None else "–",
            str(len(cell.runs)),
            *[_pct(*cell.test_accuracy(s), cell.test_interval(s)) for s in settings],
            _bytes(cell.state_bytes(longest)) if longest else "–",
            "/".join(str(s) for s in steps) or "–",
            f"{len(reached)}/{len(cell.runs)}" + (f" (≤{max(reached)})" if reached else ""),
            f"{sum(seconds):.0f}" if seconds else "–",
        ]
        lines.append("| " + " | ".join(cells_text) + " |")
    return lines


def distance_table(cells: list[Cell]) -> list[str]:
    buckets = sorted({b for cell in cells for run in cell.runs for b in run.by_distance})
    if not buckets:
        return []
    head = ["arm", "d_model"] + [f"[{a}, {b})" for a, b in buckets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cell in cells:
        row = [cell.arm, str(cell.width)]
        for bucket in buckets:
            correct = sum(r.by_distance.get(bucket, (0, 0))[0] for r in cell.runs)
            answers = sum(r.by_distance.get(bucket, (0, 0))[1] for r in cell.runs)
            row.append(_pct(correct / answers) + f" ({answers})" if answers else "–")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def rate_table(cells: list[Cell]) -> list[str]:
    rates = sorted({lr for cell in cells for lr in cell.rates if lr is not None})
    head = ["arm", "d_model"] + [f"lr {lr:g}" for lr in rates]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cell in cells:
        row = [cell.arm, str(cell.width)] + [_pct(cell.rates.get(lr)) for lr in rates]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _colors(labels: list[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab20")
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_accuracy_vs_length(cells: list[Cell], path: Path) -> Path:
    """Test accuracy by sequence length (pairs grow with it), one panel per width."""
    widths = sorted({c.width for c in cells})
    colors = _colors(sorted({c.arm for c in cells}))
    fig, axes = plt.subplots(1, len(widths), figsize=(6 * len(widths), 4.5), squeeze=False)
    for ax, width in zip(axes[0], widths):
        for cell in (c for c in cells if c.width == width):
            points = [
                (s[0], cell.test_accuracy(s)[0], cell.test_interval(s)) for s in _settings([cell])
            ]
            points = [(n, a, i) for n, a, i in points if a is not None]
            if points:
                lengths, values, intervals = zip(*points)
                ax.errorbar(
                    lengths,
                    [100 * a for a in values],
                    yerr=_error_bars(values, intervals),
                    marker="o",
                    capsize=3,
                    color=colors[cell.arm],
                    label=cell.arm,
                )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (pairs grow with it)")
        ax.set_ylabel("MQAR test accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.set_title(f"d_model={width}, best learning rate per arm")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower left")
    return _save(fig, path)


def _error_bars(values, intervals) -> np.ndarray:
    """[2, points] distances below and above each value (percent); 0 where no interval."""
    return np.array(
        [
            [100 * (a - i[0]), 100 * (i[1] - a)] if i else [0.0, 0.0]
            for a, i in zip(values, intervals)
        ]
    ).T


def plot_frontier(cells: list[Cell], path: Path) -> Path:
    """Accuracy against streaming state bytes per sequence, one panel per test setting and one
    point per (arm, width): the recall-versus-state trade-off."""
    settings = _settings(cells)
    colors = _colors(sorted({c.arm for c in cells}))
    fig, axes = plt.subplots(1, len(settings), figsize=(5 * len(settings), 4.5), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        for cell in cells:
            accuracy, size = cell.test_accuracy(setting)[0], cell.state_bytes(setting[0])
            if accuracy is None or size is None:
                continue
            ax.errorbar(
                size,
                100 * accuracy,
                yerr=_error_bars([accuracy], [cell.test_interval(setting)]),
                color=colors[cell.arm],
                marker=MARKERS.get(cell.width, "^"),
                linestyle="none",
                capsize=3,
                label=f"{cell.arm}, d={cell.width}",
            )
        ax.set_xscale("log")
        ax.set_xlabel(f"streaming state, peak over {setting[0]} tokens (bytes per sequence)")
        ax.set_ylabel("MQAR test accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.set_title(f"L={setting[0]}, {setting[1]} pairs")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center right")
    fig.subplots_adjust(right=0.8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def records(runs: list[MQARRun]) -> list[list]:
    """report.csv: one row per run and test setting."""
    head = ["arm", "d_model", "lr", "seed", "seq_len", "num_pairs", "split", "accuracy",
            "accuracy_low", "accuracy_high", "state_bytes", "steps", "steps_to_99",
            "train_seconds", "run_dir"]  # fmt: skip
    rows = [head]
    for run in sorted(runs, key=lambda r: (r.arm, r.width, r.lr or 0, r.seed or 0)):
        for split, by_setting in (("validation", run.validation), ("test", run.test)):
            for (length, pairs), accuracy in sorted(by_setting.items()):
                rows.append(
                    [
                        run.arm,
                        run.width,
                        run.lr,
                        run.seed,
                        length,
                        pairs,
                        split,
                        accuracy,
                        *(
                            run.test_interval.get((length, pairs)) or (None, None)
                            if split == "test"
                            else (None, None)
                        ),
                        run.state_bytes.get(length),
                        run.steps,
                        run.steps_to_99,
                        run.train_seconds,
                        str(run.path),
                    ]  # fmt: skip
                )
    return rows


def write_mqar_report(report_runs, provenance: list[str], out_dir: Path, title: str) -> dict:
    """report.md, report.csv, mqar_accuracy_vs_length.png and mqar_state_frontier.png."""
    runs = [mqar_run(run) for run in report_runs]
    cells = best_cells(runs)
    figures = {
        "accuracy_vs_length": plot_accuracy_vs_length(
            cells, out_dir / "mqar_accuracy_vs_length.png"
        ),
        "state_frontier": plot_frontier(cells, out_dir / "mqar_state_frontier.png"),
    }
    lines = [
        f"# {title}",
        "",
        *provenance,
        "",
        "MQAR test accuracy (%) per setting, each arm at its best learning rate on the validation "
        "split, with its 95% interval in brackets: one run's from a bootstrap over test examples; "
        "where several seeds ran, their mean ± standard deviation and the t interval of the mean "
        "over seeds. state = the largest "
        "streaming state of one sequence while decoding the longest tested length token by "
        "token, measured from `init_state`/`step`; "
        "steps = optimizer steps trained per seed (training stops once validation accuracy passes "
        "99%); train s = training wall time summed over the seeds (a shared machine).",
        "",
        *accuracy_table(cells),
        "",
        "Test accuracy (%) by query distance (tokens from a key's statement to its query), all "
        "test settings pooled (answers in parentheses):",
        "",
        *distance_table(cells),
        "",
        "Learning-rate sweep: mean validation accuracy (%) per rate (the best is reported above):",
        "",
        *rate_table(cells),
        "",
        *[f"![{name}]({path.name})" for name, path in figures.items()],
        "",
    ]
    atomic_write_text(out_dir / "report.md", "\n".join(lines))
    atomic_write_text(out_dir / "report.csv", csv_text(records(runs)))
    return {"runs": report_runs, "markdown": out_dir / "report.md", "figures": figures}
