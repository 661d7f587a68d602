"""PNG figures of one evaluation (series = protocols or lengths)
or of a report (series = mechanisms).

Every function takes `series`: an ordered mapping label -> rows of one results.json section,
so the same drawing serves a single run and an overlay of many.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402

Series = Mapping[str, Sequence[dict]]


def _colors(n: int):
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _lines(ax, series: Series, x: str, y: str, keep=lambda row: True, **style) -> bool:
    drawn = False
    for (label, rows), color in zip(series.items(), _colors(len(series))):
        points = sorted(
            (r[x], r[y]) for r in rows if keep(r) and r.get(y) is not None and r.get(x) is not None
        )
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3, color=color, label=label, **style)
            drawn = True
    return drawn


def _legend(ax, n: int) -> None:
    ax.legend(fontsize=7 if n > 6 else 8, ncol=2 if n > 10 else 1)


def _mark_training_lengths(ax, train_lengths: Sequence[int]) -> None:
    for i, length in enumerate(sorted(set(train_lengths))):
        ax.axvline(
            length,
            color="grey",
            linestyle="--",
            linewidth=1,
            label="training length" if i == 0 else None,
        )


def plot_ppl_vs_context(
    series: Series, train_lengths: Sequence[int], path: Path, title: str = ""
) -> Path:
    """Perplexity by evaluation length;
    one panel per protocol present, a dashed line at the training length."""
    protocols = [
        p
        for p in ("windows", "sliding", "streaming")
        if any(r["protocol"] == p and r.get("ppl") for rows in series.values() for r in rows)
    ]
    protocols = protocols or ["windows"]
    fig, axes = plt.subplots(
        1, len(protocols), figsize=(5.5 * len(protocols), 4), squeeze=False, sharey=True
    )
    for ax, protocol in zip(axes[0], protocols):
        _lines(ax, series, "context_length", "ppl", keep=lambda r, p=protocol: r["protocol"] == p)
        _mark_training_lengths(ax, train_lengths)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("evaluation context length (tokens)")
        ax.set_title(
            {
                "windows": "non-overlapping windows",
                "sliding": "sliding windows (strided)",
                "streaming": "streaming (carried state)",
            }[protocol]
        )
        ax.grid(alpha=0.3, which="both")
        _legend(ax, len(series))
    axes[0][0].set_ylabel("perplexity per token (log scale)")
    for axis in (axes[0][0].yaxis,):  # plain numbers instead of 1.09 x 10^2 on log axes
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.4g}"))
        axis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:.4g}"))
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_position_loss(
    series: Series, train_lengths: Sequence[int], path: Path, title: str = ""
) -> Path:
    """Mean loss per log-spaced position bin, drawn at each bin's geometric centre."""
    centred = {
        label: [
            {**r, "centre": math.sqrt(max(r["position_start"], 0.5) * r["position_end"])}
            for r in rows
        ]
        for label, rows in series.items()
    }
    fig, ax = plt.subplots(figsize=(6.5, 4))
    _lines(ax, centred, "centre", "loss")
    _mark_training_lengths(ax, train_lengths)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("token position in the window (log scale)")
    ax.set_ylabel("mean loss (nats / token)")
    ax.set_title(title or "Loss by token position")
    ax.grid(alpha=0.3, which="both")
    _legend(ax, len(series))
    return _save(fig, path)


def plot_prefix_ablation(series: Series, path: Path, title: str = "") -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    _lines(ax, series, "prefix_length", "loss")
    ax.set_xscale("symlog", base=2, linthresh=64)
    ax.set_xlabel("visible prefix before the target tokens (tokens)")
    ax.set_ylabel("loss on the fixed targets (nats / token)")
    ax.set_title(title or "Prefix-length ablation")
    ax.grid(alpha=0.3, which="both")
    _legend(ax, len(series))
    return _save(fig, path)


def plot_fact_recall(series: Series, path: Path, title: str = "") -> Path:
    """Accuracy of planted facts by distance (one line per series), with chance marked."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    _lines(ax, series, "distance", "accuracy")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("planted distance (characters from fact to question)")
    ax.set_ylabel("accuracy (answer ranked first)")
    ax.set_title(title or "Planted-fact recall")
    ax.grid(alpha=0.3, which="both")
    _legend(ax, len(series))
    return _save(fig, path)


def plot_passkey(series: Series, path: Path, chance: float | None = None, title: str = "") -> Path:
    """One heatmap (depth x length, colour = accuracy) per series, in a grid."""
    n = max(len(series), 1)
    columns = min(n, 4)
    lines = math.ceil(n / columns)
    fig, axes = plt.subplots(
        lines,
        columns,
        figsize=(3.4 * columns + 1, 2.9 * lines + 0.4),
        squeeze=False,
        layout="constrained",
    )
    image = None
    for ax, (label, rows) in zip(axes.flat, series.items()):
        lengths = sorted({r["context_length"] for r in rows})
        depths = sorted({r["depth"] for r in rows})
        grid = np.full((len(depths), len(lengths)), np.nan)
        for r in rows:
            if r.get("accuracy") is not None:
                grid[depths.index(r["depth"]), lengths.index(r["context_length"])] = r["accuracy"]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [str(v) for v in lengths], fontsize=7, rotation=45)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=7)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("context length", fontsize=8)
        ax.set_ylabel("needle depth", fontsize=8)
        for (i, j), value in np.ndenumerate(grid):
            ax.text(
                j,
                i,
                "-" if np.isnan(value) else f"{value:.2f}",
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
    fig.suptitle(heading + (f" (chance {chance:.2f})" if chance is not None else ""))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)  # constrained layout already placed the colour bar and titles
    plt.close(fig)
    return path


def plot_cost_quality(
    points: Mapping[str, tuple[float, float]], path: Path, xlabel: str, ylabel: str, title: str = ""
) -> Path:
    """One point per series: cost on x (log scale), quality on y. Points are numbered and named in
    a legend below the axes, so long labels (a hybrid's settings) never squeeze the plot."""
    fig, ax = plt.subplots(figsize=(7, 4.5 + 0.22 * len(points)))
    for number, ((label, (x, y)), color) in enumerate(zip(points.items(), _colors(len(points))), 1):
        ax.scatter([x], [y], color=color, s=30, label=f"{number}: {label}")
        ax.annotate(str(number), (x, y), fontsize=8, xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    # Plain numbers on the log axis (the default minor labels, 5x10^3, 6x10^3, ..., overlap);
    # minor ticks are labelled only when the points span less than a decade.
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    costs = [x for x, _ in points.values()]
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(
        plain if costs and max(costs) < 10 * min(costs) else NullFormatter()
    )
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.15), frameon=False)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title or "Quality versus training cost")
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)
