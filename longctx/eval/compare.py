"""Comparing runs: arms (a mechanism's runs over seeds), their pooled figures with intervals,
paired differences against a baseline, the noise floor between seeds, and equal-compute points.

Pairing: two runs scored on identical windows of one test split (equal `test_digest` and
`plan_digest`) are compared document by document: the difference of their mean losses is
sum_d (nll_a(d) - nll_b(d)) / sum_d tokens(d), and its interval resamples documents, so the
document-to-document variation both runs share cancels. Planted facts pair fact by fact. An arm
with several seeds enters with each document's mean NLL over its seeds.

Noise floor: the largest paired difference between two seeds of one arm. A difference between
arms is called distinguishable when its paired interval excludes zero and, where seeds measured
it, it is larger than the noise floor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from longctx.eval.stats import Bootstrap, ratio_interval, wilson_interval


@dataclass
class Run:
    path: Path
    results: dict
    units: dict = field(default_factory=dict)  # units.json ({} for runs evaluated before it)
    cost: dict = field(default_factory=dict)
    curve: list[dict] = field(default_factory=list)  # validation points of metrics.jsonl
    label: str = ""  # the arm's label: mechanism and the settings telling it apart (no seed)

    @property
    def group(self) -> tuple[str, str, int]:
        r = self.results
        return (r["data"], r["tokenizer"], int(r["train_context_length"]))

    @property
    def seed(self) -> Any:
        return (self.results.get("train") or {}).get("seed")


@dataclass
class Arm:
    label: str
    runs: list[Run]

    @property
    def seeds(self) -> list:
        return [run.seed for run in self.runs]

    @property
    def name(self) -> str:
        return self.runs[0].results["attention"]


@dataclass(frozen=True)
class Estimate:
    """A figure with its interval and, for several seeds, each seed's own value."""

    value: float | None
    low: float | None = None
    high: float | None = None
    per_seed: tuple = ()
    units: int = 0  # documents (or facts, trials) behind the interval

    def exp(self) -> Estimate:
        """The same figure through exp (a loss as a perplexity)."""

        def e(v):
            return None if v is None else math.exp(min(v, 700.0))

        return Estimate(
            e(self.value),
            e(self.low),
            e(self.high),
            tuple(e(v) for v in self.per_seed),
            self.units,
        )


def group_arms(runs: list[Run]) -> list[Arm]:
    arms: dict[str, list[Run]] = {}
    for run in runs:
        arms.setdefault(run.label, []).append(run)
    return [
        Arm(label, sorted(members, key=lambda r: str(r.seed))) for label, members in arms.items()
    ]


def bootstrap_of(runs: list[Run]) -> Bootstrap:
    settings = (runs[0].results.get("eval_settings") or {}).get("bootstrap") or {}
    return Bootstrap(**settings)


# --- perplexity rows and their per-document scores ---


def perplexity_row(run: Run, length: int, protocol: str) -> dict | None:
    return next(
        (
            r
            for r in run.results.get("perplexity", [])
            if r["protocol"] == protocol
            and (protocol == "streaming" or r["context_length"] == length)
            and r.get("loss") is not None
        ),
        None,
    )


def perplexity_units(run: Run, length: int, protocol: str) -> dict | None:
    return next(
        (
            u
            for u in run.units.get("perplexity", [])
            if u["protocol"] == protocol
            and (protocol == "streaming" or u["context_length"] == length)
        ),
        None,
    )


def _pairable(units: list[dict | None], runs: list[Run]) -> bool:
    """Scored on identical tokens: one split, one window plan, the same documents."""
    if any(u is None for u in units):
        return False
    digests = {r.results.get("test_digest") for r in runs}
    plans = {u.get("plan_digest") for u in units}
    documents = {tuple(u["documents"]) for u in units}
    return len(digests) == 1 and None not in digests and len(plans) == 1 and len(documents) == 1


def _mean_nll(units: list[dict]) -> np.ndarray:
    return np.mean([np.asarray(u["nll"], dtype=np.float64) for u in units], axis=0)


def arm_loss(arm: Arm, length: int, protocol: str, bootstrap: Bootstrap) -> Estimate | None:
    """The arm's mean loss per token (nats) at `length`, documents resampled; with seeds, each
    document's NLL is the mean over the seeds."""
    return _arm_ratio(arm, length, protocol, bootstrap, "loss", "tokens", 1.0)


def arm_bits_per_byte(arm: Arm, length: int, bootstrap: Bootstrap) -> Estimate | None:
    """The arm's bits per UTF-8 byte at `length` (windows), as `arm_loss` pools its seeds."""
    return _arm_ratio(arm, length, "windows", bootstrap, "bpb", "bytes", 1 / math.log(2))


def _arm_ratio(
    arm: Arm, length: int, protocol: str, bootstrap: Bootstrap, key: str, per: str, scale: float
) -> Estimate | None:
    """A figure that is NLL x `scale` per unit `per` (tokens or bytes), summed by document: one
    run's own interval, the seeds pooled by document when they scored the same windows, or the
    mean of the seeds otherwise."""
    rows = [perplexity_row(run, length, protocol) for run in arm.runs]
    rows = [r for r in rows if r is not None and r.get(key) is not None]
    if not rows:
        return None
    per_seed = tuple(r[key] for r in rows)
    if len(rows) == 1:
        r = rows[0]
        return Estimate(
            r[key], r.get(f"{key}_low"), r.get(f"{key}_high"), per_seed, r.get("documents") or 0
        )
    units = [perplexity_units(run, length, protocol) for run in arm.runs]
    if len(rows) == len(arm.runs) and _pairable(units, arm.runs):
        amounts = np.asarray(units[0][per], dtype=np.float64)
        value, low, high = ratio_interval(_mean_nll(units) * scale, amounts, bootstrap)
        return Estimate(value, low, high, per_seed, len(amounts))
    return _mean_of(rows, key, per_seed)


def _mean_of(rows: list[dict], key: str, per_seed: tuple) -> Estimate:
    """Seeds that cannot be pooled by document: their mean, with the mean of their intervals."""
    value = float(np.mean([r[key] for r in rows]))
    halves = [
        (r[f"{key}_high"] - r[f"{key}_low"]) / 2
        for r in rows
        if r.get(f"{key}_low") is not None and r.get(f"{key}_high") is not None
    ]
    if len(halves) != len(rows):
        return Estimate(value, per_seed=per_seed)
    half = float(np.mean(halves))
    return Estimate(value, value - half, value + half, per_seed)


@dataclass(frozen=True)
class Difference:
    """arm minus baseline, with its paired interval; `why` says why there is none."""

    value: float | None
    low: float | None = None
    high: float | None = None
    units: int = 0
    why: str | None = None

    @property
    def excludes_zero(self) -> bool:
        return self.low is not None and (self.low > 0 or self.high < 0)


def paired_loss(
    arm: Arm, baseline: Arm, length: int, protocol: str, bootstrap: Bootstrap
) -> Difference:
    """Loss of `arm` minus loss of `baseline` at `length`, paired document by document."""
    runs = arm.runs + baseline.runs
    units = [perplexity_units(run, length, protocol) for run in runs]
    if any(u is None for u in units):
        return Difference(None, why="no per-document scores (units.json) at this length")
    if not _pairable(units, runs):
        return Difference(None, why="not scored on identical windows of one test split")
    ours, theirs = units[: len(arm.runs)], units[len(arm.runs) :]
    tokens = np.asarray(units[0]["tokens"], dtype=np.float64)
    value, low, high = ratio_interval(_mean_nll(ours) - _mean_nll(theirs), tokens, bootstrap)
    return Difference(value, low, high, len(tokens))


# --- planted facts ---


def fact_units(run: Run, length: int) -> dict | None:
    return next(
        (u for u in run.units.get("fact_recall", []) if u["context_length"] == length), None
    )


def _facts_in_context(units: list[dict]) -> tuple[list[int], np.ndarray] | None:
    """Facts every run scored with the fact inside the context: their positions, and each
    fact's correct outcome averaged over the runs given."""
    if any(u is None for u in units) or len({tuple(u["documents"]) for u in units}) != 1:
        return None
    inside = [i for i, flag in enumerate(units[0]["in_context"]) if flag]
    correct = np.mean([[u["correct"][i] for i in inside] for u in units], axis=0)
    return inside, np.atleast_1d(correct)


def arm_facts_in_context(arm: Arm, length: int, confidence: float) -> Estimate | None:
    """Recall over the facts inside the context (mean over seeds), Wilson's interval over facts."""
    units = [fact_units(run, length) for run in arm.runs]
    pooled = _facts_in_context(units)
    if pooled is not None:
        inside, correct = pooled
        if not inside:
            return None
        per_seed = tuple(float(np.mean([u["correct"][i] for i in inside])) for u in units)
        low, high = wilson_interval(float(correct.sum()), len(inside), confidence)
        return Estimate(float(correct.mean()), low, high, per_seed, len(inside))
    # Runs without units.json: the rows whose facts all lay in the context.
    values = []
    for run in arm.runs:
        rows = [
            f
            for f in run.results.get("fact_recall", [])
            if f["context_length"] == length
            and f.get("accuracy") is not None
            and f["docs"]
            and f["fact_in_context"] == f["docs"]
        ]
        if rows:
            values.append((sum(f["correct"] for f in rows), sum(f["docs"] for f in rows)))
    return _share_over_seeds(values, confidence)


def paired_facts(arm: Arm, baseline: Arm, length: int, bootstrap: Bootstrap) -> Difference:
    units = [fact_units(run, length) for run in arm.runs + baseline.runs]
    if any(u is None for u in units):
        return Difference(None, why="no per-fact outcomes (units.json)")
    ours = _facts_in_context(units[: len(arm.runs)])
    theirs = _facts_in_context(units[len(arm.runs) :])
    if (
        ours is None
        or theirs is None
        or ours[0] != theirs[0]
        or len({tuple(u["documents"]) for u in units}) != 1
    ):
        return Difference(None, why="not scored on the same facts")
    if not ours[0]:
        return Difference(None, why="no fact inside the context")
    difference = ours[1] - theirs[1]
    value, low, high = ratio_interval(difference, np.ones_like(difference), bootstrap)
    return Difference(value, low, high, len(difference))


# --- passkey ---


def arm_passkey(arm: Arm, keep, confidence: float) -> Estimate | None:
    """Share of correct trials over the cells `keep` selects, mean over seeds; Wilson's
    interval over one seed's trials (the seeds share their prompts)."""
    per_seed = []
    for run in arm.runs:
        cells = [
            p for p in run.results.get("passkey", []) if p.get("accuracy") is not None and keep(p)
        ]
        if cells:
            per_seed.append((sum(p["correct"] for p in cells), sum(p["trials"] for p in cells)))
    return _share_over_seeds(per_seed, confidence)


def _share_over_seeds(per_seed: list[tuple[int, int]], confidence: float) -> Estimate | None:
    """(correct, tried) per seed: the mean share, with Wilson's interval over one seed's count
    of trials (the seeds share their prompts), or None without any."""
    if not per_seed:
        return None
    correct, tried = (float(np.mean(v)) for v in zip(*per_seed))
    low, high = wilson_interval(correct, round(tried), confidence)
    return Estimate(correct / tried, low, high, tuple(c / n for c, n in per_seed), round(tried))


# --- noise floor ---


@dataclass(frozen=True)
class SeedGap:
    label: str
    seeds: tuple
    difference: Difference


def seed_gaps(arms: list[Arm], length: int, bootstrap: Bootstrap) -> list[SeedGap]:
    """Paired loss differences between every two seeds of each arm with several."""
    gaps = []
    for arm in arms:
        for a, b in combinations(arm.runs, 2):
            difference = paired_loss(
                Arm(arm.label, [a]), Arm(arm.label, [b]), length, "windows", bootstrap
            )
            if difference.value is None:
                rows = [perplexity_row(r, length, "windows") for r in (a, b)]
                if all(rows):
                    difference = Difference(rows[0]["loss"] - rows[1]["loss"], why=difference.why)
            gaps.append(SeedGap(arm.label, (a.seed, b.seed), difference))
    return gaps


def noise_floor(gaps: list[SeedGap]) -> float | None:
    values = [abs(g.difference.value) for g in gaps if g.difference.value is not None]
    return max(values) if values else None


def verdict(
    difference: Difference, floor: float | None, baseline: str, better: str, worse: str
) -> str:
    """In words: is the difference distinguishable from zero and from seed noise?"""
    if difference.value is None:
        return f"no paired difference: {difference.why}"
    if difference.low is None:
        return "no interval (fewer than two units)"
    if not difference.excludes_zero:
        return f"not distinguishable from {baseline} (the interval holds 0)"
    if floor is not None and abs(difference.value) <= floor:
        return f"within the seed noise floor ({floor:.3g}): not distinguishable from {baseline}"
    direction = better if difference.value < 0 else worse
    suffix = "" if floor is not None else " (no seeds: noise between runs not measured)"
    return f"{direction} than {baseline}{suffix}"


# --- equal compute ---


def arm_curve(arm: Arm) -> list[dict]:
    """Validation points of the arm (mean over seeds at the steps every seed logged)."""
    curves = [run.curve for run in arm.runs if run.curve]
    if not curves:
        return []
    steps = set.intersection(*({p["step"] for p in c} for c in curves))
    points = []
    for step in sorted(steps):
        at = [next(p for p in c if p["step"] == step) for c in curves]
        point = {"step": step}
        for key in ("tokens", "flops", "train_seconds", "val_loss"):
            values = [p.get(key) for p in at]
            point[key] = None if any(v is None for v in values) else float(np.mean(values))
        points.append(point)
    return points


def value_at(curve: list[dict], x: str, budget: float) -> float | None:
    """Validation loss at `budget` of `x` (linear between validation points), None outside."""
    points = [
        (p[x], p["val_loss"])
        for p in curve
        if p.get(x) is not None and p.get("val_loss") is not None
    ]
    if not points or budget < points[0][0] or budget > points[-1][0]:
        return None
    xs, ys = zip(*points)
    return float(np.interp(budget, xs, ys))


def common_budget(curves: list[list[dict]], x: str) -> float | None:
    """The largest amount of `x` that every curve reached."""
    ends = [max((p[x] for p in c if p.get(x) is not None), default=None) for c in curves]
    ends = [e for e in ends if e is not None]
    return min(ends) if ends and len(ends) == len(curves) else None
