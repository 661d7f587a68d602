"""Writing evaluation results: results.json, results.csv, a PNG plot, and wandb tables/images."""
from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS_SCHEMA_VERSION = 1
ROW_FIELDS = ("context_length", "stride", "protocol", "tokens", "bytes", "loss", "ppl", "bpb", "skipped")


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file in the same directory and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_results(out_dir: Path, meta: dict[str, Any], rows: Sequence[dict]) -> dict[str, Path]:
    out_dir = Path(out_dir)
    payload = {"schema_version": RESULTS_SCHEMA_VERSION, **meta, "perplexity": list(rows)}
    json_path = out_dir / "results.json"
    atomic_write_text(json_path, json.dumps(payload, indent=2))
    csv_path = out_dir / "results.csv"
    records = [["attention", *ROW_FIELDS]] + [[meta.get("attention")] + [row.get(k) for k in ROW_FIELDS] for row in rows]
    atomic_write_text(csv_path, _csv_text(records))
    png_path = out_dir / "ppl_vs_context.png"
    plot_perplexity(rows, meta, png_path)
    return {"json": json_path, "csv": csv_path, "png": png_path}


def _csv_text(records: list[list]) -> str:
    handle = io.StringIO()
    csv.writer(handle, lineterminator="\n").writerows(records)
    return handle.getvalue()


def plot_perplexity(rows: Sequence[dict], meta: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for protocol in sorted({r["protocol"] for r in rows}):
        points = sorted((r["context_length"], r["ppl"]) for r in rows if r["protocol"] == protocol and r["ppl"])
        if points:
            ax.plot(*zip(*points), marker="o", label=f"{meta.get('attention')} ({protocol})")
    train_length = meta.get("train_context_length")
    if train_length:
        ax.axvline(train_length, color="grey", linestyle="--", label=f"training length {train_length}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("evaluation context length (tokens)")
    ax.set_ylabel("perplexity (per token)")
    ax.set_title("Perplexity by context length")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def log_to_wandb(rows: Sequence[dict], paths: dict[str, Path]) -> None:
    """Log the table and plot to the active wandb run, if there is one."""
    import wandb

    if wandb.run is None:
        return
    table = wandb.Table(columns=list(ROW_FIELDS), data=[[row.get(k) for k in ROW_FIELDS] for row in rows])
    wandb.log({"eval/perplexity": table, "eval/ppl_vs_context": wandb.Image(str(paths["png"]))})
