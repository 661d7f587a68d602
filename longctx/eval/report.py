"""Report mode: many runs' results.json overlaid, one line per mechanism, next to what each cost.

`python eval.py report.runs='outputs/train/multiruns/<time>/*'` (a glob, a directory holding
run directories, or a list of either). Runs are grouped by (corpus, tokenizer, training length)
because perplexities are only comparable within a group. Writes report.md (one summary table
per group, planted-fact recall by distance, figure links), report.csv and the PNG figures.
"""

from __future__ import annotations

import glob
import json
import math
import shlex
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from longctx.core.files import atomic_write_text
from longctx.errors import ConfigError
from longctx.eval import plots
from longctx.eval.costs import load_bench, run_costs
from longctx.eval.outputs import csv_text

SUMMARY_COLUMNS = (
    "mechanism",
    "parameters",
    "ppl_windows",
    "ppl_sliding",
    "bpb",
    "longest_length",
    "ppl_longest",
    "ppl_streaming",
    "prefix_gain",
    "passkey_within",
    "passkey_beyond",
    "fact_recall_in_reach",
    "tokens_per_s",
    "peak_memory_mib",
    "train_seconds",
    "run_dir",
)


@dataclass
class Run:
    path: Path
    results: dict
    cost: dict = field(default_factory=dict)
    label: str = ""

    @property
    def group(self) -> tuple[str, str, int]:
        return (
            self.results["data"],
            self.results["tokenizer"],
            int(self.results["train_context_length"]),
        )


def find_run_dirs(patterns: str | Sequence[str]) -> tuple[list[Path], list[Path]]:
    """(run directories with a results.json,
    run directories without one: failed or unfinished jobs).

    A pattern is a glob or a directory; a directory without results.json also stands for its
    sub-directories (a multirun root). Run directories are recognised by Hydra's `.hydra/`.
    """
    found, missing = [], []
    for pattern in [patterns] if isinstance(patterns, str) else list(patterns):
        for match in sorted(glob.glob(str(Path(pattern).expanduser()))):
            path = Path(match)
            candidates = (
                [path]
                if (path / "results.json").is_file() or not path.is_dir()
                else [path] + [c for c in sorted(path.iterdir()) if c.is_dir()]
            )
            for candidate in candidates:
                if (candidate / "results.json").is_file():
                    found.append(candidate)
                elif (candidate / ".hydra").is_dir():
                    missing.append(candidate)
    return list(dict.fromkeys(found)), list(dict.fromkeys(missing))


def load_runs(
    patterns, bench: str | None = None, bench_dtype: str = "bf16"
) -> tuple[list[Run], list[Path]]:
    directories, missing = find_run_dirs(patterns)
    bench_rows = load_bench(bench)
    runs = []
    for directory in directories:
        results = json.loads((directory / "results.json").read_text())
        runs.append(Run(directory, results, run_costs(directory, results, bench_rows, bench_dtype)))
    for group in group_runs(runs).values():
        assign_labels(group)
    return runs, missing


def group_runs(runs: list[Run]) -> dict[tuple, list[Run]]:
    groups = defaultdict(list)
    for run in runs:
        groups[run.group].append(run)
    return dict(sorted(groups.items()))


def _setting_items(run: Run) -> dict[str, Any]:
    r = run.results
    items = {k: v for k, v in r.get("attention_options", {}).items() if k != "name"}
    items.update({f"model.{k}": v for k, v in r.get("model", {}).items()})
    items["seed"] = r.get("train", {}).get("seed")
    return {
        k: json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v
        for k, v in items.items()
    }


def assign_labels(group: list[Run]) -> None:
    """The mechanism's name; runs sharing a name get the settings that tell them apart."""
    by_name = defaultdict(list)
    for run in group:
        by_name[run.results["attention"]].append(run)
    for name, same in by_name.items():
        settings = [_setting_items(run) for run in same]
        keys = sorted(
            {k for s in settings for k in s if len({str(t.get(k)) for t in settings}) > 1}
        )
        for run, setting in zip(same, settings):
            run.label = name + (
                " (" + ", ".join(f"{k}={setting.get(k)}" for k in keys) + ")" if keys else ""
            )


def _pick(rows: list[dict], **where) -> dict | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in where.items())), None)


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def summarise(run: Run) -> dict[str, Any]:
    """The report's numbers for one run (None where the run has no such measurement)."""
    r, length = run.results, int(run.results["train_context_length"])
    perplexity = r.get("perplexity", [])
    windows = _pick(perplexity, context_length=length, protocol="windows") or {}
    sliding = _pick(perplexity, context_length=length, protocol="sliding") or {}
    streaming = _pick(perplexity, protocol="streaming") or {}
    longest = max(
        (p for p in perplexity if p["protocol"] == "windows"),
        key=lambda p: p["context_length"],
        default={},
    )
    prefixes = [p for p in r.get("prefix_ablation", []) if p.get("loss") is not None]
    passkey = [p for p in r.get("passkey", []) if p.get("accuracy") is not None]
    recall = [
        f
        for f in r.get("fact_recall", [])
        if f["context_length"] == length and f.get("accuracy") is not None
    ]
    in_reach = [f for f in recall if f["docs"] and f["fact_in_context"] == f["docs"]]
    return {
        "mechanism": run.label,
        "parameters": r.get("parameters"),
        "ppl_windows": windows.get("ppl"),
        "ppl_sliding": sliding.get("ppl"),
        "bpb": windows.get("bpb"),
        "longest_length": longest.get("context_length"),
        "ppl_longest": longest.get("ppl"),
        "longest_skipped": longest.get("skipped"),
        "ppl_streaming": streaming.get("ppl"),
        "prefix_gain": prefixes[0]["loss"] - prefixes[-1]["loss"]
        if len(prefixes) > 1 and prefixes[0]["prefix_length"] == 0
        else None,
        "prefix_longest": prefixes[-1]["prefix_length"] if prefixes else None,
        "passkey_within": _mean([p["accuracy"] for p in passkey if p["context_length"] <= length]),
        "passkey_beyond": _mean([p["accuracy"] for p in passkey if p["context_length"] > length]),
        "fact_recall_in_reach": sum(f["correct"] for f in in_reach)
        / sum(f["docs"] for f in in_reach)
        if in_reach
        else None,
        "tokens_per_s": run.cost.get("tokens_per_s"),
        "peak_memory_mib": run.cost.get("peak_memory_mib"),
        "train_seconds": run.cost.get("train_seconds"),
        "run_dir": str(run.path),
    }


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.1e}"
    return str(value)


def _slug(group: tuple) -> str:
    data, tokenizer, length = group
    return f"{data}-{tokenizer}-ctx{length}".replace("/", "_").replace(":", "_")


def _group_table(runs: list[Run], summaries: list[dict], length: int) -> list[str]:
    longest = sorted({s["longest_length"] for s in summaries if s["longest_length"]})
    longest_head = f"ppl @{longest[0]}" if len(longest) == 1 else "ppl @longest"
    prefix = sorted({s["prefix_longest"] for s in summaries if s["prefix_longest"]})
    prefix_head = f"Δloss prefix 0→{prefix[0]}" if len(prefix) == 1 else "Δloss prefix 0→max"
    head = [
        "mechanism",
        "params",
        f"ppl @{length}",
        f"ppl @{length} sliding",
        f"bpb @{length}",
        longest_head,
        "ppl streaming",
        prefix_head,
        f"passkey ≤{length}",
        f"passkey >{length}",
        "facts in context",
        "train tok/s",
        "peak MiB",
        "train s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _run, s in zip(runs, summaries):
        longest_cell = "skipped" if s["longest_skipped"] else _fmt(s["ppl_longest"])
        if len(longest) > 1 and s["longest_length"]:
            longest_cell += f" ({s['longest_length']})"
        cells = [
            s["mechanism"],
            f"{s['parameters'] / 1e6:.2f}M" if s["parameters"] else "–",
            _fmt(s["ppl_windows"]),
            _fmt(s["ppl_sliding"]),
            _fmt(s["bpb"]),
            longest_cell,
            _fmt(s["ppl_streaming"]),
            _fmt(s["prefix_gain"]),
            _fmt(s["passkey_within"], 2),
            _fmt(s["passkey_beyond"], 2),
            _fmt(s["fact_recall_in_reach"], 2),
            _fmt(s["tokens_per_s"]),
            _fmt(s["peak_memory_mib"]),
            _fmt(s["train_seconds"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _recall_table(runs: list[Run], length: int) -> list[str]:
    rows = {
        run.label: {
            f["distance"]: f
            for f in run.results.get("fact_recall", [])
            if f["context_length"] == length
        }
        for run in runs
    }
    distances = sorted({d for by_distance in rows.values() for d in by_distance if d is not None})
    if not distances:
        return []
    head = ["mechanism"] + [f"distance {d}" for d in distances]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, by_distance in rows.items():
        cells = []
        for d in distances:
            f = by_distance.get(d)
            cells.append(
                "–"
                if not f or f.get("accuracy") is None
                else f"{f['accuracy']:.2f} ({f['fact_in_context']}/{f['docs']} in context)"
            )
        lines.append("| " + " | ".join([label] + cells) + " |")
    return lines


def _position_rows(run: Run, length: int) -> list[dict]:
    """The run's loss-by-position bins at `length` (else at its longest evaluated length)."""
    rows = run.results.get("position_loss", [])
    lengths = {p["context_length"] for p in rows}
    at = length if length in lengths else max(lengths, default=None)
    return [p for p in rows if p["context_length"] == at]


def _position_table(runs: list[Run], length: int) -> list[str]:
    """Mean loss (nats) per token-position bin, one row per mechanism:
    the numbers behind the plot."""
    rows = {
        run.label: {
            (p["position_start"], p["position_end"]): p["loss"] for p in _position_rows(run, length)
        }
        for run in runs
    }
    bins = sorted({b for by_bin in rows.values() for b in by_bin})
    if not bins:
        return []
    head = ["mechanism"] + [f"[{a}, {b})" for a, b in bins]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, by_bin in rows.items():
        lines.append("| " + " | ".join([label] + [_fmt(by_bin.get(b)) for b in bins]) + " |")
    return lines


def _chance(runs: list[Run], section: str) -> float | None:
    counts = {r.results.get("eval_settings", {}).get(section, {}).get("distractors") for r in runs}
    return 1 / (1 + counts.pop()) if len(counts) == 1 and None not in counts else None


def _group_figures(
    runs: list[Run], summaries: list[dict], length: int, out_dir: Path, slug: str
) -> dict[str, Path]:
    figures = {}
    series = {run.label: run.results.get("perplexity", []) for run in runs}
    figures["ppl"] = plots.plot_ppl_vs_context(
        series,
        [length],
        out_dir / f"ppl_vs_context_{slug}.png",
        title=f"Perplexity by context length ({slug})",
    )
    positions = {run.label: _position_rows(run, length) for run in runs}
    if any(positions.values()):
        figures["position"] = plots.plot_position_loss(
            positions,
            [length],
            out_dir / f"loss_vs_position_{slug}.png",
            title=f"Loss by token position, windows of {length} ({slug})",
        )
    prefixes = {run.label: run.results.get("prefix_ablation", []) for run in runs}
    if any(p.get("loss") is not None for rows in prefixes.values() for p in rows):
        figures["prefix"] = plots.plot_prefix_ablation(
            prefixes,
            out_dir / f"prefix_ablation_{slug}.png",
            title=f"Prefix-length ablation ({slug})",
        )
    passkey = {
        run.label: run.results.get("passkey", []) for run in runs if run.results.get("passkey")
    }
    if any(p.get("accuracy") is not None for rows in passkey.values() for p in rows):
        figures["passkey"] = plots.plot_passkey(
            passkey,
            out_dir / f"passkey_{slug}.png",
            chance=_chance(runs, "passkey"),
            title=f"Passkey retrieval by likelihood ({slug})",
        )
    recall = {
        run.label: [f for f in run.results.get("fact_recall", []) if f["context_length"] == length]
        for run in runs
    }
    if any(f.get("accuracy") is not None for rows in recall.values() for f in rows):
        figures["fact_recall"] = plots.plot_fact_recall(
            recall,
            out_dir / f"fact_recall_{slug}.png",
            title=f"Planted-fact recall at {length} tokens ({slug})",
        )
    points = {
        s["mechanism"]: (s["tokens_per_s"], s["ppl_windows"])
        for s in summaries
        if s["tokens_per_s"] and s["ppl_windows"]
    }
    if points:
        figures["cost"] = plots.plot_cost_quality(
            points,
            out_dir / f"cost_vs_quality_{slug}.png",
            xlabel="training throughput (tokens/s, log scale)",
            ylabel=f"perplexity @{length} (windows)",
            title=f"Quality versus training throughput ({slug})",
        )
    return figures


def sweep_wall_seconds(runs: list[Run]) -> float | None:
    """From the first run's start (Hydra writes .hydra/ when a job starts)
    to the last evaluation's end."""
    starts, ends = [], []
    for run in runs:
        config = run.path / ".hydra" / "config.yaml"
        if config.is_file():
            starts.append(config.stat().st_mtime)
        elif run.results.get("started_at"):
            starts.append(datetime.fromisoformat(run.results["started_at"]).timestamp())
        if run.results.get("finished_at"):
            ends.append(datetime.fromisoformat(run.results["finished_at"]).timestamp())
    return max(ends) - min(starts) if starts and ends else None


def training_commands(runs: list[Run]) -> list[str]:
    """The command lines that produced the runs,
    from Hydra's multirun.yaml (or each run's overrides)."""
    commands = []
    for run in runs:
        sweep, single = run.path.parent / "multirun.yaml", run.path / ".hydra" / "overrides.yaml"
        if sweep.is_file():
            overrides, prefix = OmegaConf.load(sweep).hydra.overrides.task, "python train.py -m"
        elif single.is_file():
            overrides, prefix = OmegaConf.load(single), "python train.py"
        else:
            continue
        commands.append(" ".join([prefix, *(shlex.quote(str(o)) for o in overrides)]))
    return list(dict.fromkeys(commands))


def _provenance(runs: list[Run], missing: list[Path], patterns, command: str | None) -> list[str]:
    versions = sorted({str(r.results.get("code_version")) for r in runs})
    wall = sweep_wall_seconds(runs)
    lines = [
        f"- runs: {len(runs)} from `{patterns}`"
        + (
            f"; {len(missing)} without results: " + ", ".join(f"`{m.name}`" for m in missing)
            if missing
            else ""
        ),
        f"- code version(s) of the evaluations: {', '.join(f'`{v}`' for v in versions)}",
    ]
    lines += [f"- produced by: `{c}`" for c in training_commands(runs)]
    if wall is not None:
        lines.append(
            f"- wall time from the first run's start to the last evaluation: {wall / 60:.1f} min"
        )
    if command:
        lines.append(f"- report: `{command}`")
    return lines


def markdown(
    runs: list[Run], missing: list[Path], figures: dict, patterns, title: str, command: str | None
) -> str:
    lines = [
        f"# {title}",
        "",
        *_provenance(runs, missing, patterns, command),
        "",
        "Columns: perplexity per token (windows: non-overlapping windows; sliding: strided "
        "windows, stride recorded in each run's results.csv); bpb = bits per UTF-8 byte; Δloss "
        "prefix = loss of fixed targets with no prefix minus with the longest prefix (nats; "
        "larger = distant context used more); passkey = share of trials where the true key was "
        "the most likely (≤/> the training length); facts in context = planted-fact recall over "
        "the facts that lay inside the context; train tok/s, peak MiB and train s come from the "
        "training logs or the bench (see report.csv).",
        "",
    ]
    for group, group_runs_ in group_runs(runs).items():
        data, tokenizer, length = group
        summaries = [summarise(run) for run in group_runs_]
        lines += [
            f"## {data} ({tokenizer} tokenizer, trained at {length} tokens)",
            "",
            *_group_table(group_runs_, summaries, length),
            "",
        ]
        recall = _recall_table(group_runs_, length)
        if recall:
            chance = _chance(group_runs_, "fact_recall")
            lines += [
                f"Planted-fact recall at {length} tokens by planted distance (accuracy"
                + (f"; chance {chance:.2f}" if chance else "")
                + "):",
                "",
                *recall,
                "",
            ]
        position = _position_table(group_runs_, length)
        if position:
            lines += [
                "Loss by token position (mean nats per token over the non-overlapping windows of "
                f"{length} tokens; position p predicts with p + 1 tokens of context):",
                "",
                *position,
                "",
            ]
        lines += [f"![{name}]({path.name})" for name, path in figures[group].items()] + [""]
    return "\n".join(lines)


def write_report(report_cfg, out_dir: Path, command: str | None = None) -> dict:
    """report.md, report.csv and figures for the runs `report_cfg.runs` names,
    in `report_cfg.output_dir` or out_dir.

    `command` (how the report was asked for) is recorded next to the runs' own command lines.
    """
    out_dir = Path(report_cfg.get("output_dir") or out_dir)
    patterns = report_cfg["runs"]
    patterns = patterns if isinstance(patterns, str) else list(patterns)
    runs, missing = load_runs(
        patterns, report_cfg.get("bench"), report_cfg.get("bench_dtype") or "bf16"
    )
    if not runs:
        raise FileNotFoundError(f"no results.json under report.runs={patterns}")
    recall_probes = [run for run in runs if run.results.get("mqar")]
    if recall_probes:  # data=mqar: compared by recall accuracy and state size, not perplexity
        return _mqar_report(runs, recall_probes, missing, patterns, out_dir, report_cfg, command)
    figures, records = (
        {},
        [list(SUMMARY_COLUMNS) + ["data", "tokenizer", "train_context_length", "cost_sources"]],
    )
    for group, members in group_runs(runs).items():
        summaries = [summarise(run) for run in members]
        figures[group] = _group_figures(members, summaries, group[2], out_dir, _slug(group))
        for run, s in zip(members, summaries):
            records.append(
                [s[c] for c in SUMMARY_COLUMNS]
                + list(group)
                + [json.dumps(run.cost.get("sources", {}))]
            )
    text = markdown(
        runs,
        missing,
        figures,
        patterns,
        report_cfg.get("title") or "Comparison of attention mechanisms",
        command,
    )
    atomic_write_text(out_dir / "report.md", text)
    atomic_write_text(out_dir / "report.csv", csv_text(records))
    _log_report_to_wandb(records, figures)
    return {"runs": runs, "missing": missing, "markdown": out_dir / "report.md", "figures": figures}


def _mqar_report(runs, recall_probes, missing, patterns, out_dir, report_cfg, command) -> dict:
    from longctx.eval.mqar_report import write_mqar_report

    if len(recall_probes) != len(runs):
        raise ConfigError(
            f"report.runs={patterns} mixes {len(recall_probes)} data=mqar runs with "
            f"{len(runs) - len(recall_probes)} corpus runs; report each kind separately"
        )
    title = report_cfg.get("title") or "Multi-query associative recall"
    provenance = _provenance(runs, missing, patterns, command)
    return write_mqar_report(runs, provenance, out_dir, title)


def _log_report_to_wandb(records: list[list], figures: dict) -> None:
    import wandb

    if wandb.run is None:
        return
    clean = [
        [None if isinstance(v, float) and math.isnan(v) else v for v in row] for row in records[1:]
    ]
    logged = {"report/summary": wandb.Table(columns=records[0], data=clean)}
    for group, paths in figures.items():
        for name, path in paths.items():
            logged[f"report/{_slug(group)}/{name}"] = wandb.Image(str(path))
    wandb.log(logged)
