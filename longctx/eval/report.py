"""Report mode: many runs' results overlaid, one line per mechanism, next to what each cost.

`python eval.py report.runs='outputs/train/multiruns/<time>'` (a glob, a directory holding run
directories, or a list of either). Runs are grouped by (corpus, tokenizer, training length),
because perplexities are comparable only within a group; within a group, runs that differ only
in their seed form one arm. Writes report.md (per group: a summary with intervals, paired
differences against a baseline, the noise floor between seeds, the equal-compute view,
planted-fact recall and loss by position), report.csv (one row per run) and the PNG figures,
and prints the report's path.

Another section joins with `register_report_section(make)`: `make(group)` returns a
ReportPart (markdown lines and figures) or None for groups it has nothing to say about.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import shlex
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from longctx.core.files import atomic_write_text
from longctx.core.run_names import flatten, value_text
from longctx.errors import ConfigError
from longctx.eval import plots
from longctx.eval.compare import (
    Arm,
    Difference,
    Estimate,
    Run,
    arm_bits_per_byte,
    arm_curve,
    arm_facts_in_context,
    arm_loss,
    arm_passkey,
    bootstrap_of,
    common_budget,
    group_arms,
    noise_floor,
    paired_facts,
    paired_loss,
    seed_gaps,
    value_at,
    verdict,
)
from longctx.eval.costs import load_bench, run_costs, training_curve, training_dir
from longctx.eval.outputs import UNITS_FILE, csv_text

log = logging.getLogger(__name__)

RUN_COLUMNS = (
    "mechanism",
    "seed",
    "parameters",
    "ppl_windows",
    "ppl_windows_low",
    "ppl_windows_high",
    "ppl_sliding",
    "bpb",
    "bpb_low",
    "bpb_high",
    "longest_length",
    "ppl_longest",
    "ppl_streaming",
    "prefix_gain",
    "prefix_gain_low",
    "prefix_gain_high",
    "passkey_within",
    "passkey_beyond",
    "fact_recall_in_reach",
    "tokens_per_s",
    "shared_cpu",
    "peak_memory_mib",
    "train_seconds",
    "train_flops",
    "run_dir",
)


# --- finding and labelling runs ---


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
        units_path = directory / UNITS_FILE
        units = json.loads(units_path.read_text()) if units_path.is_file() else {}
        runs.append(
            Run(
                directory,
                results,
                units,
                run_costs(directory, results, bench_rows, bench_dtype),
                training_curve(training_dir(directory, results)),
            )
        )
    for group in group_runs(runs).values():
        assign_labels(group)
    return runs, missing


def group_runs(runs: list[Run]) -> dict[tuple, list[Run]]:
    groups = defaultdict(list)
    for run in runs:
        groups[run.group].append(run)
    return dict(sorted(groups.items()))


def _settings(run: Run) -> dict[str, str]:
    """The run's backend and model settings, flattened, as label text (the seed left out)."""
    r = run.results
    items = {k: v for k, v in flatten(r.get("attention_options", {})).items() if k != "name"}
    items.update(flatten(r.get("model", {}), "model."))
    return {k: value_text(v) for k, v in items.items()}


def _distinguishing_keys(settings: list[dict[str, str]]) -> list[str]:
    """The fewest keys (greedily: most telling first, then keys every run has) whose values tell
    the runs apart as well as all their settings do."""
    keys = sorted({k for s in settings for k in s})
    differing = [k for k in keys if len({s.get(k) for s in settings}) > 1]

    def partition(chosen):
        return len({tuple(s.get(k) for k in chosen) for s in settings})

    target, chosen = partition(differing), []
    while partition(chosen) < target:
        best = max(
            (k for k in differing if k not in chosen),
            key=lambda k: (
                partition(chosen + [k]),
                all(k in s for s in settings),
                -differing.index(k),
            ),
        )
        chosen.append(best)
    return [k for k in differing if k in chosen]


def assign_labels(group: list[Run]) -> None:
    """The mechanism's name; runs sharing a name get the few settings that tell them apart.
    Runs that differ only in their seed share a label: they are one arm."""
    by_name = defaultdict(list)
    for run in group:
        by_name[run.results["attention"]].append(run)
    for name, same in by_name.items():
        settings = [_settings(run) for run in same]
        keys = _distinguishing_keys(settings)
        for run, setting in zip(same, settings):
            shown = ", ".join(f"{k}={setting[k]}" for k in keys if k in setting)
            run.label = name + (f" ({shown})" if shown else "")


# --- one run's figures (report.csv) ---


def summarise(run: Run) -> dict[str, Any]:
    """The report's numbers for one run (None where the run has no such measurement)."""
    r, length = run.results, int(run.results["train_context_length"])
    perplexity = r.get("perplexity", [])

    def pick(**where):
        return next((p for p in perplexity if all(p.get(k) == v for k, v in where.items())), {})

    windows = pick(context_length=length, protocol="windows")
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
    last_prefix = prefixes[-1] if len(prefixes) > 1 and prefixes[0]["prefix_length"] == 0 else {}

    def share(cells):
        return sum(p["correct"] for p in cells) / sum(p["trials"] for p in cells) if cells else None

    return {
        "mechanism": run.label,
        "seed": run.seed,
        "parameters": r.get("parameters"),
        "ppl_windows": windows.get("ppl"),
        "ppl_windows_low": windows.get("ppl_low"),
        "ppl_windows_high": windows.get("ppl_high"),
        "ppl_sliding": pick(context_length=length, protocol="sliding").get("ppl"),
        "bpb": windows.get("bpb"),
        "bpb_low": windows.get("bpb_low"),
        "bpb_high": windows.get("bpb_high"),
        "longest_length": longest.get("context_length"),
        "ppl_longest": longest.get("ppl"),
        "ppl_streaming": pick(protocol="streaming").get("ppl"),
        "prefix_gain": last_prefix.get("gain")
        if "gain" in last_prefix
        else (prefixes[0]["loss"] - last_prefix["loss"] if last_prefix else None),
        "prefix_gain_low": last_prefix.get("gain_low"),
        "prefix_gain_high": last_prefix.get("gain_high"),
        "passkey_within": share([p for p in passkey if p["context_length"] <= length]),
        "passkey_beyond": share([p for p in passkey if p["context_length"] > length]),
        "fact_recall_in_reach": sum(f["correct"] for f in in_reach)
        / sum(f["docs"] for f in in_reach)
        if in_reach
        else None,
        "tokens_per_s": run.cost.get("tokens_per_s"),
        "shared_cpu": run.cost.get("shared_cpu"),
        "peak_memory_mib": run.cost.get("peak_memory_mib"),
        "train_seconds": run.cost.get("train_seconds"),
        "train_flops": next(
            (p["flops"] for p in reversed(run.curve) if p.get("flops") is not None), None
        ),
        "run_dir": display_path(run.path),
    }


# --- formatting ---


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.1e}"
    return str(value)


def _cell(estimate: Estimate | None, digits: int = 3, seeds: bool = True) -> str:
    """`value [low, high]`, and each seed's value when there are several."""
    if estimate is None or estimate.value is None:
        return "–"
    text = _fmt(estimate.value, digits)
    if estimate.low is not None:
        text += f" [{_fmt(estimate.low, digits)}, {_fmt(estimate.high, digits)}]"
    if seeds and len(estimate.per_seed) > 1:
        text += " (seeds " + ", ".join(_fmt(v, digits) for v in estimate.per_seed) + ")"
    return text


def _signed(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "–"
    if abs(value) < 1e-12:  # rounding residue of equal sums
        return "0"
    return f"{value:+.{digits}g}" if abs(value) >= 1e-3 else f"{value:+.1e}"


def _difference_cell(difference: Difference) -> str:
    if difference.value is None:
        return "–"
    text = _signed(difference.value)
    if difference.low is not None:
        text += f" [{_signed(difference.low)}, {_signed(difference.high)}]"
    return text


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
        "| " + " | ".join(row) + " |" for row in rows
    ]


def display_path(path: Path) -> str:
    """A path as the report shows it: relative to the working directory when inside it."""
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(resolved)


def _slug(group: tuple) -> str:
    data, tokenizer, length = group
    return f"{data}-{tokenizer}-ctx{length}".replace("/", "_").replace(":", "_")


# --- one group ---


@dataclass
class ReportGroup:
    """What a report section sees: one corpus/tokenizer/length group of arms."""

    key: tuple
    arms: list[Arm]
    baseline: Arm
    out_dir: Path
    figures: dict[str, Path] = field(default_factory=dict)

    @property
    def data(self) -> str:
        return self.key[0]

    @property
    def length(self) -> int:
        return self.key[2]

    @property
    def slug(self) -> str:
        return _slug(self.key)

    @property
    def runs(self) -> list[Run]:
        return [run for arm in self.arms for run in arm.runs]

    @property
    def bootstrap(self):
        return bootstrap_of(self.runs)

    def chance(self, section: str) -> float | None:
        counts = {
            (r.results.get("eval_settings") or {}).get(section, {}).get("distractors")
            for r in self.runs
        }
        return 1 / (1 + counts.pop()) if len(counts) == 1 and None not in counts else None


@dataclass
class ReportPart:
    lines: list[str]
    figures: dict[str, Path] = field(default_factory=dict)


def choose_baseline(arms: list[Arm], wanted: str | None) -> Arm:
    """The arm named `wanted` (label or mechanism), else `full` when present, else the first."""
    for name in ([wanted] if wanted else []) + ["full"]:
        for arm in arms:
            if arm.label == name or (
                arm.name == name and len([a for a in arms if a.name == name]) == 1
            ):
                return arm
    return arms[0]


def _longest_length(group: ReportGroup) -> int | None:
    """The longest evaluation length every arm scored with non-overlapping windows."""
    common = None
    for run in group.runs:
        lengths = {
            p["context_length"]
            for p in run.results.get("perplexity", [])
            if p["protocol"] == "windows" and p.get("loss") is not None
        }
        common = lengths if common is None else common & lengths
    return max(common) if common else None


def _summary_table(group: ReportGroup) -> list[str]:
    length, boot = group.length, group.bootstrap
    confidence = boot.confidence
    longest = _longest_length(group)
    show_longest = longest is not None and longest != length
    head = [
        "mechanism",
        "seeds",
        "params",
        f"ppl @{length}",
        f"ppl @{length} sliding",
        f"bpb @{length}",
    ]
    head += [f"ppl @{longest}"] if show_longest else []
    head += ["ppl streaming", "Δloss prefix", f"passkey ≤{length}", f"passkey >{length}"]
    head += ["facts in context", "train tok/s", "peak MiB", "train s"]
    rows = []
    for arm in group.arms:
        first = arm.runs[0]
        summaries = [summarise(run) for run in arm.runs]

        loss = arm_loss(arm, length, "windows", boot)
        sliding = arm_loss(arm, length, "sliding", boot)
        facts = arm_facts_in_context(arm, length, confidence)
        cells = [
            arm.label,
            ", ".join(str(s) for s in arm.seeds),
            f"{first.results['parameters'] / 1e6:.2f}M" if first.results.get("parameters") else "–",
            _cell(loss.exp() if loss else None),
            _cell(sliding.exp() if sliding else None, seeds=False),
            _cell(arm_bits_per_byte(arm, length, boot), seeds=False),
        ]
        if show_longest:
            at_longest = arm_loss(arm, longest, "windows", boot)
            cells.append(_cell(at_longest.exp() if at_longest else None, seeds=False))
        streaming = arm_loss(arm, length, "streaming", boot)
        cells += [
            _cell(streaming.exp() if streaming else None, seeds=False),
            _prefix_cell(arm),
            _count_cell(arm_passkey(arm, lambda p: p["context_length"] <= length, confidence)),
            _count_cell(arm_passkey(arm, lambda p: p["context_length"] > length, confidence)),
            _count_cell(facts),
            _fmt(_mean(summaries, "tokens_per_s"))
            + ("*" if any(s["shared_cpu"] for s in summaries) else ""),
            _fmt(_mean(summaries, "peak_memory_mib")),
            _fmt(_mean(summaries, "train_seconds")),
        ]
        rows.append(cells)
    return _table(head, rows)


def _mean(summaries: list[dict], key: str) -> float | None:
    values = [s[key] for s in summaries if s[key] is not None]
    return float(np.mean(values)) if values else None


def _prefix_cell(arm: Arm) -> str:
    """Gain over prefix 0 at the longest prefix (first seed), with its paired interval."""
    rows = [p for p in arm.runs[0].results.get("prefix_ablation", []) if p.get("loss") is not None]
    if len(rows) < 2 or rows[0]["prefix_length"] != 0:
        return "–"
    last = rows[-1]
    gain = last.get("gain", rows[0]["loss"] - last["loss"])
    text = _signed(gain)
    if last.get("gain_low") is not None:
        text += f" [{_signed(last['gain_low'])}, {_signed(last['gain_high'])}]"
    return text + f" (0→{last['prefix_length']})"


def _count_cell(estimate: Estimate | None) -> str:
    if estimate is None or estimate.value is None:
        return "–"
    return f"{estimate.value:.2f} [{estimate.low:.2f}, {estimate.high:.2f}] (n={estimate.units})"


def _paired_part(group: ReportGroup) -> ReportPart | None:
    others = [arm for arm in group.arms if arm is not group.baseline]
    if not others:
        return None
    length, boot, base = group.length, group.bootstrap, group.baseline
    longest = _longest_length(group)
    gaps = seed_gaps(group.arms, length, boot)
    floor = noise_floor(gaps)
    head = ["mechanism", f"Δloss @{length} (nats)"]
    head += [f"Δloss @{longest}"] if longest and longest != length else []
    head += ["Δ facts in context", "in words (loss at the training length)"]
    rows, differences = [], {}
    for arm in others:
        at_length = paired_loss(arm, base, length, "windows", boot)
        differences[arm.label] = (at_length.value, at_length.low, at_length.high)
        cells = [arm.label, _difference_cell(at_length)]
        if longest and longest != length:
            cells.append(_difference_cell(paired_loss(arm, base, longest, "windows", boot)))
        facts = paired_facts(arm, base, length, boot)
        cells.append(_difference_cell(facts))
        cells.append(verdict(at_length, floor, base.label, "lower loss", "higher loss"))
        rows.append(cells)
    lines = [
        f"Paired differences against **{base.label}** (mechanism minus {base.label}; "
        f"{boot.confidence:.0%} intervals over the documents both scored; facts paired fact by "
        "fact). Negative Δloss: lower loss than the baseline.",
        "",
        *_table(head, rows),
        "",
    ]
    if not gaps:
        lines += [
            "No arm has two seeds, so the noise between runs of one mechanism is not measured "
            "here: an interval that excludes 0 says the two checkpoints differ on these "
            "documents, not that the mechanisms would differ on another seed.",
            "",
        ]
    figure = None
    drawn = {k: v for k, v in differences.items() if v[0] is not None}
    if drawn:
        style_of = dict(zip([a.label for a in group.arms], plots.series_styles(len(group.arms))))
        figure = plots.plot_paired_differences(
            drawn,
            group.out_dir / f"paired_differences_{group.slug}.png",
            xlabel=f"Δloss @{length} against {base.label} (nats per token)",
            noise_floor=floor,
            title=f"Paired differences against {base.label} ({group.slug})",
            styles=[style_of[label] for label in drawn],
        )
    return ReportPart(lines, {"paired_differences": figure} if figure else {})


def _noise_part(group: ReportGroup) -> ReportPart | None:
    """The paired differences between seeds of one arm, and the noise floor they set."""
    gaps = seed_gaps(group.arms, group.length, group.bootstrap)
    if not gaps:
        return None
    floor = noise_floor(gaps)
    rows = [
        [g.label, " vs ".join(str(s) for s in g.seeds), _difference_cell(g.difference)]
        for g in gaps
    ]
    lines = [
        "Noise floor: the same mechanism trained with another seed, scored on the same windows "
        f"(Δloss @{group.length}, paired by document):",
        "",
        *_table(["mechanism", "seeds", f"Δloss @{group.length}"], rows),
        "",
    ]
    if floor is not None:
        lines += [
            f"Differences between mechanisms no larger than {floor:.3g} nats (the largest seed "
            "gap) are not called distinguishable.",
            "",
        ]
    return ReportPart(lines)


def _compute_part(group: ReportGroup) -> ReportPart | None:
    curves = {arm.label: arm_curve(arm) for arm in group.arms}
    if not any(curves.values()) or not all(curves.values()):
        return None
    flops = common_budget(list(curves.values()), "flops")
    seconds = common_budget(list(curves.values()), "train_seconds")
    steps = common_budget(list(curves.values()), "step")
    head = ["mechanism", "steps", "training FLOPs", "train s", "val loss (last)"]
    head += [f"val loss @ step {steps:.0f}"] if steps else []
    head += [f"val loss @ {flops:.3g} FLOPs"] if flops else []
    head += [f"val loss @ {seconds:.0f} s"] if seconds else []
    rows = []
    for label, curve in curves.items():
        last = curve[-1]
        cells = [
            label,
            f"{last['step']:.0f}",
            _fmt(last.get("flops")),
            _fmt(last.get("train_seconds")),
            _fmt(last["val_loss"]),
        ]
        if steps:
            cells.append(_fmt(value_at(curve, "step", steps)))
        if flops:
            cells.append(_fmt(value_at(curve, "flops", flops)))
        if seconds:
            cells.append(_fmt(value_at(curve, "train_seconds", seconds)))
        rows.append(cells)
    figure = plots.plot_training_curves(
        curves,
        group.out_dir / f"training_curves_{group.slug}.png",
        title=f"Validation loss at equal compute ({group.slug})",
    )
    lines = [
        "Equal compute: validation loss (the run's own validation batches, from its metrics.jsonl) "
        "read at the largest budget every mechanism reached: steps, model FLOPs (the backends' "
        "counted work, longctx/flops.py) and training seconds (a shared machine's seconds: "
        "indicative only). A point inside a run's schedule is not what a run planned for that "
        "budget would reach (its learning rate had not decayed).",
        "",
        *_table(head, rows),
        "",
    ]
    return ReportPart(lines, {"training_curves": figure})


def _recall_part(group: ReportGroup) -> ReportPart | None:
    length = group.length
    by_arm = {
        arm.label: {
            f["distance"]: f
            for f in arm.runs[0].results.get("fact_recall", [])
            if f["context_length"] == length
        }
        for arm in group.arms
    }
    distances = sorted({d for rows in by_arm.values() for d in rows if d is not None})
    if not distances:
        return None
    rows = []
    for label, by_distance in by_arm.items():
        cells = [label]
        for d in distances:
            f = by_distance.get(d)
            if not f or f.get("accuracy") is None:
                cells.append("–")
                continue
            interval = (
                f" [{f['accuracy_low']:.2f}, {f['accuracy_high']:.2f}]"
                if f.get("accuracy_low") is not None
                else ""
            )
            cells.append(
                f"{f['correct']}/{f['docs']}{interval} ({f['fact_in_context']} in context)"
            )
        rows.append(cells)
    chance = group.chance("fact_recall")
    lines = [
        f"Planted-fact recall at {length} tokens by planted distance (correct/scored, Wilson "
        f"interval; first seed of each mechanism"
        + (f"; chance {chance:.2f}" if chance else "")
        + "):",
        "",
        *_table(["mechanism"] + [f"distance {d}" for d in distances], rows),
        "",
    ]
    return ReportPart(lines)


def _position_rows(run: Run, length: int) -> list[dict]:
    """The run's loss-by-position bins at `length` (else at its longest evaluated length)."""
    rows = run.results.get("position_loss", [])
    lengths = {p["context_length"] for p in rows}
    at = length if length in lengths else max(lengths, default=None)
    return [p for p in rows if p["context_length"] == at]


def _position_part(group: ReportGroup) -> ReportPart | None:
    rows = {arm.label: _position_rows(arm.runs[0], group.length) for arm in group.arms}
    bins = sorted({(p["position_start"], p["position_end"]) for r in rows.values() for p in r})
    if not bins:
        return None
    lines_out = []
    for label, positions in rows.items():
        by_bin = {(p["position_start"], p["position_end"]): p for p in positions}
        cells = [label]
        for b in bins:
            p = by_bin.get(b)
            cells.append(
                "–" if p is None else _fmt(p["loss"]) + ("*" if p.get("few_tokens") else "")
            )
        lines_out.append(cells)
    minimum = (group.runs[0].results.get("eval_settings") or {}).get("min_bin_tokens")
    lines = [
        "Loss by token position (mean nats per token over the non-overlapping windows of "
        f"{group.length} tokens, first seed; position p predicts with p + 1 tokens of context; "
        + (f"* = fewer than {minimum} tokens in the bin; " if minimum else "")
        + "intervals in each run's position_loss.csv and the figure):",
        "",
        *_table(["mechanism"] + [f"[{a}, {b})" for a, b in bins], lines_out),
        "",
    ]
    return ReportPart(lines)


ReportSection = Callable[[ReportGroup], ReportPart | None]
REPORT_SECTIONS: list[ReportSection] = [
    _paired_part,
    _noise_part,
    _compute_part,
    _recall_part,
    _position_part,
]


def register_report_section(make: ReportSection) -> None:
    """A section after the built-in ones, for every group (it returns None where it does not
    apply)."""
    REPORT_SECTIONS.append(make)


# --- figures shared by every group ---


def average_rows(row_sets: list[list[dict]], keys: Sequence[str]) -> list[dict]:
    """Rows matched by `keys` across seeds, numeric fields averaged (perplexities recomputed from
    the mean loss); a row missing from any seed is left out."""
    if len(row_sets) == 1:
        return list(row_sets[0])
    matched = defaultdict(list)
    for rows in row_sets:
        for row in rows:
            matched[tuple(row.get(k) for k in keys)].append(row)
    averaged = []
    for rows in matched.values():
        if len(rows) != len(row_sets):
            continue
        row = dict(rows[0])
        for key, value in rows[0].items():
            values = [r.get(key) for r in rows]
            if isinstance(value, bool) or key in keys:
                row[key] = any(values) if isinstance(value, bool) else value
            elif isinstance(value, (int, float)) and all(
                isinstance(v, (int, float)) for v in values
            ):
                row[key] = float(np.mean(values))
        for suffix in ("", "_low", "_high"):
            if row.get(f"loss{suffix}") is not None and f"ppl{suffix}" in row:
                row[f"ppl{suffix}"] = math.exp(min(row[f"loss{suffix}"], 700.0))
        averaged.append(row)
    return averaged


def _arm_rows(arm: Arm, section: str, keys: Sequence[str]) -> list[dict]:
    return average_rows([run.results.get(section, []) for run in arm.runs], keys)


def _group_figures(group: ReportGroup) -> dict[str, Path]:
    arms, length, out, slug = group.arms, group.length, group.out_dir, group.slug
    figures = {}

    def series(section, keys):
        return {arm.label: _arm_rows(arm, section, keys) for arm in arms}

    figures["ppl"] = plots.plot_ppl_vs_context(
        series("perplexity", ("context_length", "protocol")),
        [length],
        out / f"ppl_vs_context_{slug}.png",
        title=f"Perplexity by context length ({slug})",
    )
    positions = {
        arm.label: average_rows(
            [_position_rows(run, length) for run in arm.runs], ("position_start", "position_end")
        )
        for arm in arms
    }
    if any(positions.values()):
        figures["position"] = plots.plot_position_loss(
            positions,
            [length],
            out / f"loss_vs_position_{slug}.png",
            title=f"Loss by token position, windows of {length} ({slug})",
        )
    prefixes = series("prefix_ablation", ("prefix_length",))
    if any(p.get("loss") is not None for rows in prefixes.values() for p in rows):
        figures["prefix"] = plots.plot_prefix_ablation(
            prefixes, out / f"prefix_ablation_{slug}.png", title=f"Prefix-length ablation ({slug})"
        )
    passkey = {  # first seed: a cell's text is its count of correct trials
        arm.label: arm.runs[0].results["passkey"]
        for arm in arms
        if arm.runs[0].results.get("passkey")
    }
    if any(p.get("accuracy") is not None for rows in passkey.values() for p in rows):
        figures["passkey"] = plots.plot_passkey(
            passkey,
            out / f"passkey_{slug}.png",
            chance=group.chance("passkey"),
            title=f"Passkey retrieval by likelihood ({slug}, first seed)",
        )
    recall = {
        arm.label: [
            f for f in arm.runs[0].results.get("fact_recall", []) if f["context_length"] == length
        ]
        for arm in arms
    }
    if any(f.get("accuracy") is not None for rows in recall.values() for f in rows):
        figures["fact_recall"] = plots.plot_fact_recall(
            recall,
            out / f"fact_recall_{slug}.png",
            title=f"Planted-fact recall at {length} tokens ({slug}, first seed)",
            chance=group.chance("fact_recall"),
        )
    points = {}
    for arm in arms:
        loss = arm_loss(arm, length, "windows", group.bootstrap)
        speeds = [r.cost.get("tokens_per_s") for r in arm.runs if r.cost.get("tokens_per_s")]
        if loss and loss.value is not None and speeds:
            ppl = loss.exp()
            points[arm.label] = {
                "x": float(np.mean(speeds)),
                "y": ppl.value,
                "y_low": ppl.low,
                "y_high": ppl.high,
            }
    if points:
        figures["cost"] = plots.plot_cost_quality(
            points,
            out / f"cost_vs_quality_{slug}.png",
            xlabel="training throughput (tokens/s, log scale)",
            ylabel=f"perplexity @{length} (windows)",
            title=f"Quality versus training throughput ({slug})",
        )
    return figures


# --- provenance and the whole report ---


def _commands(runs: list[Run]) -> list[str]:
    """The command lines behind the runs: the training runs' and, for runs evaluated from a
    checkpoint, the evaluation's (Hydra's multirun.yaml, or each run's overrides)."""
    commands = []
    for run in runs:
        trained = training_dir(run.path, run.results)
        programs = [(trained, "train.py")] + (
            [(run.path, "eval.py")] if trained != run.path else []
        )
        for directory, program in programs:
            sweep = directory.parent / "multirun.yaml"
            single = directory / ".hydra" / "overrides.yaml"
            if sweep.is_file():
                overrides, prefix = (
                    OmegaConf.load(sweep).hydra.overrides.task,
                    f"python {program} -m",
                )
            elif single.is_file():
                overrides, prefix = OmegaConf.load(single), f"python {program}"
            else:
                continue
            commands.append(" ".join([prefix, *(shlex.quote(str(o)) for o in overrides)]))
    return list(dict.fromkeys(commands))


def _compute_line(runs: list[Run]) -> str | None:
    """Training and evaluation time summed over the runs (metrics.jsonl and eval_seconds)."""
    train = [r.cost.get("train_seconds") for r in runs if r.cost.get("train_seconds")]
    evaluation = [sum((r.results.get("eval_seconds") or {}).values()) for r in runs]
    if not train and not any(evaluation):
        return None
    parts = []
    if train:
        parts.append(f"training {sum(train) / 60:.1f} min over {len(train)} runs")
    if any(evaluation):
        parts.append(f"evaluation {sum(evaluation) / 60:.1f} min")
    return "- time summed over runs (the machine may have been shared): " + ", ".join(parts)


def _provenance(runs: list[Run], missing: list[Path], patterns, command: str | None) -> list[str]:
    versions = sorted({str(r.results.get("code_version")) for r in runs})
    arms = {(r.group, r.label) for r in runs}
    source = patterns if isinstance(patterns, str) else ", ".join(map(str, patterns))
    lines = [
        f"- runs: {len(runs)} ({len(arms)} arm{'s' if len(arms) != 1 else ''}) from `{source}`"
        + (
            f"; {len(missing)} without results: " + ", ".join(f"`{m.name}`" for m in missing)
            if missing
            else ""
        ),
        f"- code version(s) of the evaluations: {', '.join(f'`{v}`' for v in versions)}",
    ]
    lines += [f"- produced by: `{c}`" for c in _commands(runs)]
    compute = _compute_line(runs)
    if compute:
        lines.append(compute)
    if command:
        lines.append(f"- report: `{command}`")
    return lines


def _legend_text(confidence: float) -> str:
    return (
        "Columns: perplexity per token (windows: non-overlapping windows spread over the test "
        "split; sliding: strided windows); bpb = bits per UTF-8 byte; Δloss prefix = loss of fixed "
        "targets with no prefix minus with the longest prefix (nats; larger = distant context "
        "used more); passkey = share of trials where the true key was the most likely (≤/> the "
        "training length); facts in context = planted-fact recall over the facts that lay inside "
        "the context. `[a, b]`: "
        f"{confidence:.0%} interval, documents resampled (passkey and facts: Wilson over trials, "
        "n given); with several seeds, the value pools them document by document and each "
        "seed's own value follows. train tok/s, peak MiB and train s come from each run's "
        "metrics.jsonl (or the bench, see report.csv); seeds' mean. `*`: measured while other "
        "processes kept the CPU busy (the run's metrics.jsonl logs the load average above its "
        "own threads): a shared-machine figure, not the kernel's cost."
    )


def write_report(report_cfg, out_dir: Path, command: str | None = None) -> dict:
    """report.md, report.csv and figures for the runs `report_cfg.runs` names,
    in `report_cfg.output_dir` or out_dir; prints the report's path.

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
    title = report_cfg.get("title") or "Comparison of attention mechanisms"
    lines = [f"# {title}", "", *_provenance(runs, missing, patterns, command), ""]
    lines += [_legend_text(bootstrap_of(runs).confidence), ""]
    records = [list(RUN_COLUMNS) + ["data", "tokenizer", "train_context_length", "cost_sources"]]
    all_figures = {}
    for key, members in group_runs(runs).items():
        arms = group_arms(members)
        group = ReportGroup(key, arms, choose_baseline(arms, report_cfg.get("baseline")), out_dir)
        group.figures = _group_figures(group)
        data, tokenizer, length = key
        lines += [f"## {data} ({tokenizer} tokenizer, trained at {length} tokens)", ""]
        lines += [*_summary_table(group), ""]
        for make in REPORT_SECTIONS:
            part = make(group)
            if part is not None:
                lines += part.lines
                group.figures.update(part.figures)
        lines += [f"![{name}]({path.name})" for name, path in group.figures.items()] + [""]
        all_figures[key] = group.figures
        for run in members:
            s = summarise(run)
            records.append(
                [s[c] for c in RUN_COLUMNS] + list(key) + [json.dumps(run.cost.get("sources", {}))]
            )
    markdown_path = out_dir / "report.md"
    atomic_write_text(markdown_path, "\n".join(lines))
    atomic_write_text(out_dir / "report.csv", csv_text(records))
    _log_report_to_wandb(records, all_figures)
    print(f"report: {markdown_path}")
    log.info("report written to %s", markdown_path)
    return {"runs": runs, "missing": missing, "markdown": markdown_path, "figures": all_figures}


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
