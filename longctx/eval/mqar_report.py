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
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from longctx.core.files import atomic_write_text  # noqa: E402
from longctx.core.run_names import flatten, value_text  # noqa: E402
from longctx.eval.costs import training_dir  # noqa: E402
from longctx.eval.outputs import csv_text  # noqa: E402
from longctx.eval.plots import figure_legend, save_figure  # noqa: E402
from longctx.eval.stats import student_t_quantile  # noqa: E402

ARM_OPTIONS_IGNORED = ("name", "kernel")  # how a backend runs, not what it computes
# Each arm a colour and a marker (10 colours x 7 markers never repeat a pair below 70 arms);
# widths past the narrowest draw hollow markers.
ARM_MARKERS = ("o", "s", "^", "D", "v", "P", "X")


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
    """`sliding_window (window=16)`, `hybrid (pattern=rwkv+full)`: the backend and the options
    that define what it computes, flattened (an empty mapping of options adds nothing)."""
    options = {
        k: v
        for k, v in flatten(results.get("attention_options", {})).items()
        if k not in ARM_OPTIONS_IGNORED and v != {}
    }
    if not options:
        return results["attention"]
    text = ", ".join(f"{k}={value_text(v)}" for k, v in sorted(options.items()))
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


def _styles(cells: list[Cell]) -> dict[tuple[str, int], dict]:
    """Matplotlib keywords per (arm, width): a distinct colour and marker per arm."""
    arms = sorted({c.arm for c in cells})
    narrowest = min(c.width for c in cells)
    colors = plt.get_cmap("tab10").colors
    styles = {}
    for cell in cells:
        i = arms.index(cell.arm)
        color = colors[i % len(colors)]
        styles[(cell.arm, cell.width)] = {
            "color": color,
            "marker": ARM_MARKERS[i % len(ARM_MARKERS)],
            "markerfacecolor": color if cell.width == narrowest else "none",
        }
    return styles


def _curves(settings: list[tuple[int, int]]) -> list[tuple[str, list[tuple[int, int]], int]]:
    """The two views of the test settings: (x label, settings, x index) for accuracy by length
    along the pairs-per-token ratio most settings share (pairs grow with length), and by pairs
    at the length tested with most pair counts; a view with fewer than two settings is left out.
    """
    ratios = [pairs / length for length, pairs in settings]
    ratio = max(set(ratios), key=ratios.count) if ratios else None
    by_length = [s for s, r in zip(settings, ratios) if r == ratio]
    lengths = [length for length, _ in settings]
    busiest = max(set(lengths), key=lengths.count) if lengths else None
    by_pairs = [s for s in settings if s[0] == busiest]
    views = [
        (f"sequence length (pairs = length / {1 / ratio:g})", by_length, 0),
        (f"key-value pairs at length {busiest}", by_pairs, 1),
    ]
    return [view for view in views if len(view[1]) > 1]


def plot_accuracy_vs_length(cells: list[Cell], path: Path) -> Path:
    """Test accuracy by sequence length (pairs growing with it) and by pairs at one length,
    one row of panels per width."""
    widths = sorted({c.width for c in cells})
    views = _curves(_settings(cells)) or [("sequence length", _settings(cells), 0)]
    styles = _styles(cells)
    fig, axes = plt.subplots(
        len(widths),
        len(views),
        figsize=(6.5 * len(views), 4.5 * len(widths) + 2.0),
        squeeze=False,
        layout="constrained",
    )
    for row, width in enumerate(widths):
        for ax, (xlabel, settings, index) in zip(axes[row], views):
            for cell in (c for c in cells if c.width == width):
                points = [
                    (s[index], cell.test_accuracy(s)[0], cell.test_interval(s)) for s in settings
                ]
                points = [(x, a, i) for x, a, i in points if a is not None]
                if points:
                    xs, values, intervals = zip(*points)
                    ax.errorbar(
                        xs,
                        [100 * a for a in values],
                        yerr=_error_bars(values, intervals),
                        capsize=3,
                        label=cell.arm,
                        **styles[(cell.arm, cell.width)],
                    )
            ax.plot(
                [s[index] for s in settings],
                [100 / s[1] for s in settings],
                linestyle="--",
                color="0.4",
                label="bag of values: one of the example's values, guessed (1 / pairs)",
            )
            ax.set_xscale("log", base=2)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("MQAR test accuracy (%)")
            ax.set_ylim(-2, 102)
            ax.set_title(f"d_model={width}, best learning rate per arm")
            ax.grid(alpha=0.3)
    fig.suptitle("MQAR test accuracy (95% intervals)")
    figure_legend(fig, axes.flatten())
    return save_figure(fig, path)


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
    styles = _styles(cells)
    columns = min(len(settings), 3)
    rows = -(-len(settings) // columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(5 * columns, 4 * rows + 1.5), squeeze=False, layout="constrained"
    )
    panels = axes.flatten()
    for ax in panels[len(settings) :]:
        ax.set_visible(False)
    for ax, setting in zip(panels, settings):
        for cell in cells:
            accuracy, size = cell.test_accuracy(setting)[0], cell.state_bytes(setting[0])
            if accuracy is None or size is None:
                continue
            ax.errorbar(
                size,
                100 * accuracy,
                yerr=_error_bars([accuracy], [cell.test_interval(setting)]),
                linestyle="none",
                capsize=3,
                label=f"{cell.arm}, d={cell.width}",
                **styles[(cell.arm, cell.width)],
            )
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(f"state bytes per sequence (peak over {setting[0]} tokens)")
        ax.set_ylabel("MQAR test accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.set_title(f"L={setting[0]}, {setting[1]} pairs")
        ax.grid(alpha=0.3)
    fig.suptitle("Recall against streaming state (95% intervals)")
    figure_legend(fig, panels[: len(settings)])
    return save_figure(fig, path)


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
