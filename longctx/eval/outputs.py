"""Writing one evaluation: results.json, one CSV per section, PNG plots, and wandb tables/plots.

The schema (every key and column) is documented in docs/results/README.md.
"""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from longctx.core.files import atomic_write_text
from longctx.eval import plots
from longctx.eval.perplexity import PerplexityRow

RESULTS_SCHEMA_VERSION = 3
UNITS_FILE = "units.json"
ROW_FIELDS = tuple(PerplexityRow.__dataclass_fields__)
# Section of results.json -> its CSV file and columns (after a leading "attention" column).
SECTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "perplexity": ("results.csv", ROW_FIELDS),
    "position_loss": (
        "position_loss.csv",
        (
            "context_length",
            "position_start",
            "position_end",
            "tokens",
            "documents",
            "loss",
            "loss_low",
            "loss_high",
            "few_tokens",
        ),
    ),
    "prefix_ablation": (
        "prefix_ablation.csv",
        (
            "prefix_length",
            "target_tokens",
            "samples",
            "tokens",
            "documents",
            "loss",
            "loss_low",
            "loss_high",
            "ppl",
            "gain",
            "gain_low",
            "gain_high",
            "skipped",
        ),
    ),
    "passkey": (
        "passkey.csv",
        (
            "context_length",
            "depth",
            "trials",
            "correct",
            "accuracy",
            "accuracy_low",
            "accuracy_high",
            "mean_rank",
            "skipped",
        ),
    ),
    "streaming_memory": (
        "streaming_memory.csv",
        (
            "segment_length",
            "position_start",
            "position_end",
            "tokens",
            "documents",
            "loss_with_state",
            "loss_fresh_state",
            "gap",
            "gap_low",
            "gap_high",
        ),
    ),
    "fact_recall": (
        "fact_recall.csv",
        (
            "context_length",
            "distance",
            "docs",
            "fact_in_context",
            "correct",
            "accuracy",
            "accuracy_low",
            "accuracy_high",
            "answer_nll",
            "answer_nll_low",
            "answer_nll_high",
            "skipped",
        ),
    ),
    # data=mqar (longctx/eval/mqar.py)
    "mqar": (
        "mqar.csv",
        ("split", "seq_len", "num_pairs", "examples", "answers", "correct", "accuracy", "skipped"),
    ),
    "mqar_distance": (
        "mqar_distance.csv",
        (
            "split",
            "seq_len",
            "num_pairs",
            "distance_start",
            "distance_end",
            "answers",
            "correct",
            "accuracy",
        ),  # fmt: skip
    ),
    "state_size": ("state_size.csv", ("length", "tensors", "bytes", "peak_bytes")),
}
# The sections of a data=mqar run (a recall probe); a corpus run writes the others.
MQAR_SECTIONS = ("mqar", "mqar_distance", "state_size")


def register_section(name: str, filename: str, fields: tuple[str, ...]) -> None:
    """A results.json section of a metric outside this package's list, with its CSV schema."""
    SECTIONS[name] = (filename, tuple(fields))


def csv_text(records: list[list]) -> str:
    handle = io.StringIO()
    csv.writer(handle, lineterminator="\n").writerows(records)
    return handle.getvalue()


def write_results(
    out_dir: Path,
    meta: Mapping[str, Any],
    sections: Mapping[str, list[dict]],
    units: Mapping[str, list] | None = None,
) -> dict[str, Path]:
    """results.json (meta + every section), units.json (the per-document and per-trial scores
    behind the intervals), the sections' CSVs and the run's plots; returns the paths."""
    out_dir = Path(out_dir)
    payload = {
        "schema_version": RESULTS_SCHEMA_VERSION,
        **meta,
        **{k: list(sections.get(k, [])) for k in SECTIONS},
    }
    paths = {"json": out_dir / "results.json", "units": out_dir / UNITS_FILE}
    atomic_write_text(paths["json"], json.dumps(payload, indent=2))
    units_payload = {
        "schema_version": RESULTS_SCHEMA_VERSION,
        "test_digest": meta.get("test_digest"),
        **dict(units or {}),
    }
    atomic_write_text(paths["units"], json.dumps(units_payload))
    for section, (filename, fields) in SECTIONS.items():
        rows = sections.get(section, [])
        if rows or section == "perplexity":
            records = [["attention", *fields]] + [
                [meta.get("attention")] + [row.get(k) for k in fields] for row in rows
            ]
            paths[section] = out_dir / filename
            atomic_write_text(paths[section], csv_text(records))
    paths.update(write_run_plots(out_dir, meta, sections))
    return paths


def write_run_plots(
    out_dir: Path, meta: Mapping[str, Any], sections: Mapping[str, list[dict]]
) -> dict[str, Path]:
    name, train = (
        meta.get("attention"),
        [meta["train_context_length"]] if meta.get("train_context_length") else [],
    )
    figures = {}
    if sections.get("perplexity"):  # none for data=mqar
        figures["ppl_png"] = plots.plot_ppl_vs_context(
            {name: sections["perplexity"]},
            train,
            out_dir / "ppl_vs_context.png",
            title=f"Perplexity by context length: {name}",
        )
    by_length = defaultdict(list)
    for row in sections.get("position_loss", []):
        by_length[f"length {row['context_length']}"].append(row)
    if by_length:
        figures["position_png"] = plots.plot_position_loss(
            by_length,
            train,
            out_dir / "loss_vs_position.png",
            title=f"Loss by token position: {name}",
        )
    if any(r.get("loss") is not None for r in sections.get("prefix_ablation", [])):
        figures["prefix_png"] = plots.plot_prefix_ablation(
            {name: sections["prefix_ablation"]}, out_dir / "prefix_ablation.png"
        )
    if any(r.get("accuracy") is not None for r in sections.get("passkey", [])):
        figures["passkey_png"] = plots.plot_passkey(
            {name: sections["passkey"]},
            out_dir / "passkey_heatmap.png",
            chance=_chance(meta, "passkey"),
        )
    recall = defaultdict(list)
    for row in sections.get("fact_recall", []):
        recall[f"length {row['context_length']}"].append(row)
    if any(r.get("accuracy") is not None for rows in recall.values() for r in rows):
        figures["fact_recall_png"] = plots.plot_fact_recall(
            recall,
            out_dir / "fact_recall.png",
            title=f"Planted-fact recall: {name}",
            chance=_chance(meta, "fact_recall"),
        )
    for plot in RUN_PLOTS:
        figures.update(plot(out_dir, meta, sections))
    return figures


RunPlot = Callable[[Path, Mapping[str, Any], Mapping[str, list[dict]]], dict[str, Path]]
# Figures of sections registered from outside (outputs.register_section): each returns
# {"<name>_png": path} for the sections it draws, {} otherwise.
RUN_PLOTS: list[RunPlot] = []


def _chance(meta: Mapping[str, Any], section: str) -> float | None:
    distractors = (meta.get("eval_settings") or {}).get(section, {}).get("distractors")
    return None if distractors is None else 1 / (1 + distractors)


def log_to_wandb(sections: Mapping[str, list[dict]], paths: Mapping[str, Path]) -> None:
    """Every section as a wandb Table, perplexity as a line plot, and the PNGs,
    in the active run (if any)."""
    import wandb

    if wandb.run is None:
        return
    logged: dict[str, Any] = {}
    for section, (_, fields) in SECTIONS.items():
        rows = sections.get(section, [])
        if rows:
            logged[f"eval/{section}"] = wandb.Table(
                columns=list(fields), data=[[row.get(k) for k in fields] for row in rows]
            )
    scored = [r for r in sections.get("perplexity", []) if r.get("ppl") is not None]
    if scored:
        table = wandb.Table(
            columns=["context_length", "ppl", "protocol"],
            data=[[r["context_length"], r["ppl"], r["protocol"]] for r in scored],
        )
        logged["eval/ppl_vs_context_line"] = wandb.plot.line(
            table,
            x="context_length",
            y="ppl",
            stroke="protocol",
            title="Perplexity by context length",
        )
    for key, path in paths.items():
        if key.endswith("_png"):
            logged[f"eval/figures/{key[:-4]}"] = wandb.Image(
                str(path)
            )  # apart from the tables' keys
    wandb.log(logged)
