"""PNG figures of one evaluation (series = protocols or lengths)
or of a report (series = mechanisms).

Every function takes `series`: an ordered mapping label -> rows of one results.json section,
so the same drawing serves a single run and an overlay of many. Readability rules: every series
has its own colour and marker (and line style past ten series); legends sit outside the axes,
so they never cover data; every figure with an interval in its rows draws it; accuracy plots
mark chance and say how many samples each point rests on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

Series = Mapping[str, Sequence[dict]]
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<")
LINE_STYLES = ("-", "--", ":", "-.")


def series_styles(n: int) -> list[dict]:
    """Distinct (colour, marker) pairs for up to ten series, then line styles as well."""
    cmap = plt.get_cmap("tab10")
    return [
        {
            "color": cmap(i % 10),
            "marker": MARKERS[i % len(MARKERS)],
            "linestyle": LINE_STYLES[(i // 10) % len(LINE_STYLES)],
        }
        for i in range(n)
    ]


def _figure(panels: int = 1, width: float = 5.6, height: float = 5.0):
    fig, axes = plt.subplots(
        1, panels, figsize=(width * panels + 1.0, height), squeeze=False, layout="constrained"
    )
    return fig, axes[0]


def _dodge(index: int, count: int) -> float:
    """A factor that shifts series apart on a log x axis, so that their error bars do not hide
    each other (at most about 10% of a doubling either side)."""
    return 2 ** (0.15 * (index - (count - 1) / 2) / max(count - 1, 1))


def _plain_log2_axis(axis) -> None:
    """1, 2, 4, ... 1024 instead of 2^0 ... 2^10."""
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))


def figure_legend(fig, axes, extra: Sequence = ()) -> None:
    """One legend for the figure, outside the axes on the right (it never covers data)."""
    handles, labels = [], []
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels and not label.startswith("_"):
                handles.append(handle)
                labels.append(label)
    for handle in extra:
        handles.append(handle)
        labels.append(handle.get_label())
    if handles:  # below the axes: room for long labels, clear of the data and the title
        fig.legend(
            handles,
            labels,
            loc="outside lower center",
            ncol=min(len(handles), 3 if max(len(label) for label in labels) < 40 else 2),
            fontsize=8,
            frameon=False,
        )


def save_figure(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _finish(fig, axes, xlabel: str, ylabel: str, title: str, path: Path) -> Path:
    """Labels, a light grid and the shared legend on a one-panel figure; then saved."""
    ax = axes[0]
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    figure_legend(fig, axes)
    fig.suptitle(title)
    return save_figure(fig, path)


def _points(rows, x: str, y: str, keep=lambda row: True) -> list[dict]:
    return sorted(
        (r for r in rows if keep(r) and r.get(y) is not None and r.get(x) is not None),
        key=lambda r: r[x],
    )


def _errorbars(
    ax, points: list[dict], x: str, y: str, style: dict, label: str, dodge: float = 1.0
) -> None:
    xs = [p[x] * dodge for p in points]
    ys = [p[y] for p in points]
    lows = [p.get(f"{y}_low") for p in points]
    highs = [p.get(f"{y}_high") for p in points]
    has_interval = [lo is not None and hi is not None for lo, hi in zip(lows, highs)]
    yerr = np.array(
        [
            [max(v - lo, 0.0) if ok else 0.0 for v, lo, ok in zip(ys, lows, has_interval)],
            [max(hi - v, 0.0) if ok else 0.0 for v, hi, ok in zip(ys, highs, has_interval)],
        ]
    )
    ax.errorbar(
        xs,
        ys,
        yerr=yerr if any(has_interval) else None,
        capsize=3,
        markersize=4,
        linewidth=1.2,
        elinewidth=0.9,
        label=label,
        **style,
    )


def _mark_training_lengths(ax, train_lengths: Sequence[int]) -> None:
    for i, length in enumerate(sorted(set(train_lengths))):
        ax.axvline(
            length,
            color="grey",
            linestyle="--",
            linewidth=1,
            label="training length" if i == 0 else "_training length",
        )


def _plain_log_axis(axis) -> None:
    """Plain numbers instead of 1.09 x 10^2 on a log axis."""
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.4g}"))
    axis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:.4g}"))


def plot_ppl_vs_context(
    series: Series, train_lengths: Sequence[int], path: Path, title: str = ""
) -> Path:
    """Perplexity by evaluation length with its interval; one panel per protocol present,
    a dashed line at the training length."""
    protocols = [
        p
        for p in ("windows", "sliding", "streaming")
        if any(r["protocol"] == p and r.get("ppl") for rows in series.values() for r in rows)
    ] or ["windows"]
    fig, axes = _figure(len(protocols))
    styles = series_styles(len(series))
    for ax, protocol in zip(axes, protocols):
        for i, ((label, rows), style) in enumerate(zip(series.items(), styles)):
            points = _points(
                rows, "context_length", "ppl", lambda r, p=protocol: r["protocol"] == p
            )
            if points:
                dodge = _dodge(i, len(series))
                _errorbars(ax, points, "context_length", "ppl", style, label, dodge)
        _mark_training_lengths(ax, train_lengths)
        ax.set_xscale("log", base=2)
        _plain_log2_axis(ax.xaxis)
        ax.set_yscale("log")
        ax.set_xlabel("evaluation context length (tokens)")
        ax.set_title(
            {
                "windows": "non-overlapping windows",
                "sliding": "sliding windows (strided)",
                "streaming": "streaming (carried state)",
            }[protocol],
            fontsize=10,
        )
        ax.grid(alpha=0.3, which="both")
        _plain_log_axis(ax.yaxis)
    axes[0].set_ylabel("perplexity per token (log scale)")
    figure_legend(fig, axes)
    fig.suptitle(title or "Perplexity by context length")
    return save_figure(fig, path)


def plot_position_loss(
    series: Series, train_lengths: Sequence[int], path: Path, title: str = ""
) -> Path:
    """Mean loss per log-spaced position bin, drawn at each bin's geometric centre, with its
    interval as a band; bins flagged `few_tokens` are drawn hollow."""
    fig, axes = _figure()
    ax = axes[0]
    any_few = False
    for (label, rows), style in zip(series.items(), series_styles(len(series))):
        points = _points(
            [
                {**r, "centre": math.sqrt(max(r["position_start"], 0.5) * r["position_end"])}
                for r in rows
            ],
            "centre",
            "loss",
        )
        if not points:
            continue
        xs = [p["centre"] for p in points]
        ax.plot(xs, [p["loss"] for p in points], label=label, markersize=4, **style)
        banded = [p for p in points if p.get("loss_low") is not None]
        if banded:
            ax.fill_between(
                [p["centre"] for p in banded],
                [p["loss_low"] for p in banded],
                [p["loss_high"] for p in banded],
                color=style["color"],
                alpha=0.15,
                linewidth=0,
            )
        few = [p for p in points if p.get("few_tokens")]
        if few:
            any_few = True
            ax.plot(
                [p["centre"] for p in few],
                [p["loss"] for p in few],
                linestyle="none",
                marker=style["marker"],
                markersize=6,
                markerfacecolor="white",
                markeredgecolor=style["color"],
            )
    _mark_training_lengths(ax, train_lengths)
    ax.set_xscale("log", base=2)
    _plain_log2_axis(ax.xaxis)
    ax.set_xlabel("token position in the window (log scale)")
    ax.set_ylabel("mean loss (nats / token)")
    ax.grid(alpha=0.3, which="both")
    extra = []
    if any_few:
        extra.append(
            Line2D(
                [],
                [],
                linestyle="none",
                marker="o",
                markerfacecolor="white",
                markeredgecolor="black",
                label="hollow: a bin of few tokens",
            )
        )
    figure_legend(fig, axes, extra)
    fig.suptitle(title or "Loss by token position")
    return save_figure(fig, path)


def plot_prefix_ablation(series: Series, path: Path, title: str = "") -> Path:
    fig, axes = _figure()
    ax = axes[0]
    for i, ((label, rows), style) in enumerate(zip(series.items(), series_styles(len(series)))):
        points = _points(rows, "prefix_length", "loss")
        if points:
            _errorbars(ax, points, "prefix_length", "loss", style, label, _dodge(i, len(series)))
    ax.set_xscale("symlog", base=2, linthresh=64)
    return _finish(
        fig,
        axes,
        "visible prefix before the target tokens (tokens)",
        "loss on the fixed targets (nats / token)",
        title or "Prefix-length ablation",
        path,
    )


def _chance_line(ax, chance: float | None) -> None:
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", linewidth=1.2, label=f"chance {chance:.2f}")


def plot_fact_recall(
    series: Series, path: Path, title: str = "", chance: float | None = None
) -> Path:
    """Accuracy of planted facts by distance with Wilson intervals (one line per series), chance
    marked, and each point's count of facts written next to it."""
    fig, axes = _figure()
    ax = axes[0]
    for i, ((label, rows), style) in enumerate(zip(series.items(), series_styles(len(series)))):
        points = _points(rows, "distance", "accuracy")
        if not points:
            continue
        dodge = _dodge(i, len(series))
        _errorbars(ax, points, "distance", "accuracy", style, label, dodge)
        for p in points:
            ax.annotate(
                f"{p['correct']}/{p['docs']}",
                (p["distance"] * dodge, p["accuracy"]),
                fontsize=6,
                color=style["color"],
                xytext=(4, 2),
                textcoords="offset points",
            )
    _chance_line(ax, chance)
    ax.set_xscale("log", base=2)
    _plain_log2_axis(ax.xaxis)
    ax.set_ylim(-0.03, 1.03)
    return _finish(
        fig,
        axes,
        "planted distance (characters from fact to question)",
        "accuracy (answer ranked first)",
        title or "Planted-fact recall (correct/scored per point)",
        path,
    )


def plot_passkey(series: Series, path: Path, chance: float | None = None, title: str = "") -> Path:
    """One heatmap (depth x length, colour = accuracy) per series, in a grid; each cell says
    correct/trials, so a bright cell of two trials reads as what it is."""
    n = max(len(series), 1)
    columns = min(n, 4)
    lines = math.ceil(n / columns)
    fig, axes = plt.subplots(
        lines,
        columns,
        figsize=(3.4 * columns + 1, 2.9 * lines + 0.6),
        squeeze=False,
        layout="constrained",
    )
    image = None
    for ax, (label, rows) in zip(axes.flat, series.items()):
        lengths = sorted({r["context_length"] for r in rows})
        depths = sorted({r["depth"] for r in rows})
        grid = np.full((len(depths), len(lengths)), np.nan)
        text = np.full(grid.shape, "-", dtype=object)
        for r in rows:
            i, j = depths.index(r["depth"]), lengths.index(r["context_length"])
            if r.get("accuracy") is not None:
                grid[i, j] = r["accuracy"]
                text[i, j] = f"{r['correct']}/{r['trials']}"
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [str(v) for v in lengths], fontsize=7, rotation=45)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=7)
        ax.set_title(label, fontsize=8)
        ax.set_xlabel("context length", fontsize=8)
        ax.set_ylabel("needle depth", fontsize=8)
        for (i, j), value in np.ndenumerate(grid):
            ax.text(
                j,
                i,
                text[i, j],
                ha="center",
                va="center",
                fontsize=6,
                color="white" if np.isnan(value) or value < 0.6 else "black",
            )
    for ax in list(axes.flat)[len(series) :]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="accuracy")
    heading = title or "Passkey retrieval by likelihood"
    fig.suptitle(
        heading + " (cells: correct/trials" + (f"; chance {chance:.2f})" if chance else ")")
    )
    return save_figure(fig, path)


def plot_cost_quality(
    points: Mapping[str, dict], path: Path, xlabel: str, ylabel: str, title: str = ""
) -> Path:
    """One point per series: cost `x` on a log axis, quality `y` with its interval (`y_low`,
    `y_high`). Points are numbered and named in the legend beside the axes."""
    fig, axes = _figure(width=5.5, height=4.2)
    ax = axes[0]
    for number, ((label, p), style) in enumerate(
        zip(points.items(), series_styles(len(points))), 1
    ):
        has_interval = p.get("y_low") is not None and p.get("y_high") is not None
        ax.errorbar(
            [p["x"]],
            [p["y"]],
            yerr=[[p["y"] - p["y_low"]], [p["y_high"] - p["y"]]] if has_interval else None,
            capsize=3,
            markersize=6,
            color=style["color"],
            marker=style["marker"],
            linestyle="none",
            label=f"{number}: {label}",
        )
        ax.annotate(
            str(number), (p["x"], p["y"]), fontsize=8, xytext=(5, 3), textcoords="offset points"
        )
    ax.set_xscale("log")
    # Plain numbers at 1, 2 and 5 times the powers of ten; unlabelled minor ticks (their
    # default labels, 6x10^2 7x10^2 ..., run into each other).
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    return _finish(fig, axes, xlabel, ylabel, title or "Quality versus training cost", path)


def plot_paired_differences(
    differences: Mapping[str, tuple[float, float | None, float | None]],
    path: Path,
    xlabel: str,
    noise_floor: float | None = None,
    title: str = "",
    styles: Sequence[dict] | None = None,
) -> Path:
    """Each mechanism's difference from the baseline with its paired interval, a line at zero and
    (with seeds) the noise floor shaded: intervals clear of both are distinguishable. `styles`:
    each mechanism's style in the report's other figures."""
    labels = list(differences)
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.38 * len(labels)), layout="constrained")
    styles = styles or series_styles(len(labels))
    for i, (label, style) in enumerate(zip(labels, styles)):
        value, low, high = differences[label]
        has_interval = low is not None and high is not None
        ax.errorbar(
            [value],
            [i],
            xerr=[[value - low], [high - value]] if has_interval else None,
            capsize=3,
            color=style["color"],
            marker=style["marker"],
            linestyle="none",
        )
    ax.axvline(0, color="black", linewidth=0.8)
    if noise_floor:
        ax.axvspan(-noise_floor, noise_floor, color="grey", alpha=0.2)
        xlabel += f"\ngrey band: the seed noise floor, ±{noise_floor:.3g}"
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3, axis="x")
    ax.set_title(title or "Paired differences", fontsize=10)
    return save_figure(fig, path)


def plot_training_curves(series: Series, path: Path, title: str = "") -> Path:
    """Validation loss against training FLOPs and against training time, one line per series:
    where the mechanisms stand at equal compute rather than at equal steps."""
    fig, axes = _figure(2, width=4.6)
    styles = series_styles(len(series))
    for ax, x, xlabel in (
        (axes[0], "flops", "training FLOPs (model count, log scale)"),
        (axes[1], "train_seconds", "training time (s, log scale; machine may be shared)"),
    ):
        for (label, rows), style in zip(series.items(), styles):
            points = _points(rows, x, "val_loss")
            if points:
                ax.plot(
                    [p[x] for p in points],
                    [p["val_loss"] for p in points],
                    label=label,
                    markersize=4,
                    **style,
                )
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("validation loss (nats / token)")
    figure_legend(fig, axes)
    fig.suptitle(title or "Validation loss at equal compute")
    return save_figure(fig, path)
