"""The evaluation's sections, in the order they run, and how a new one joins.

Each EvalSection says whether it applies to a run, how much work it plans (for the progress
lines), and runs: it returns rows for one or more results.json sections and the per-unit scores
behind their intervals (units.json, which paired comparisons resample). A new metric registers
one with `register_eval_section` and its CSV schema with `outputs.register_section`:

    register_section("mqar", "mqar.csv", ("context_length", "accuracy", ...))
    register_eval_section(EvalSection("mqar", applies=..., plan=..., run=...))
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from longctx.eval.fact_recall import fact_recall, planted_facts
from longctx.eval.passkey import passkey_grid
from longctx.eval.perplexity import perplexity_by_context_length, planned_windows
from longctx.eval.prefix_ablation import prefix_ablation, prefix_lengths, sample_starts
from longctx.eval.progress import Progress
from longctx.eval.scoring import Scorer
from longctx.eval.settings import EvalSettings
from longctx.eval.streaming import streaming_perplexity
from longctx.eval.token_bytes import ByteCounter


@dataclass
class EvalContext:
    """What every section reads: the model, the test split and the settings."""

    scorer: Scorer
    datamodule: Any
    settings: EvalSettings
    train_length: int
    count_bytes: ByteCounter
    stream: np.ndarray  # the test split's tokens, each document followed by EOS
    offsets: np.ndarray  # where each document starts in `stream`, plus the stream's length
    cache: dict = field(default_factory=dict)

    @property
    def tokens(self) -> torch.Tensor:
        return torch.from_numpy(self.stream)

    @property
    def tokenizer(self):
        return self.datamodule.tokenizer

    def planted_facts(self) -> list:
        """Facts of the test documents, for corpora that plant them (data.source=synthetic)."""
        if "facts" not in self.cache:
            facts = []
            if self.datamodule.data_cfg.get("source") == "synthetic":
                from longctx.data.corpus import load_corpus

                facts = planted_facts(load_corpus(self.datamodule.data_cfg)["test"])
            self.cache["facts"] = facts
        return self.cache["facts"]


@dataclass
class SectionResult:
    sections: dict[str, list[dict]]  # results.json section -> rows
    units: dict[str, list] = field(default_factory=dict)  # units.json section -> per-unit scores


@dataclass(frozen=True)
class EvalSection:
    name: str
    applies: Callable[[EvalContext], bool]
    plan: Callable[[EvalContext], tuple[int, str, str]]  # (work units, their name, description)
    run: Callable[[EvalContext, Progress], SectionResult]


def stream_digest(stream: np.ndarray) -> str:
    """Identifies the scored split: runs with equal digests were evaluated on the same tokens."""
    return hashlib.sha256(np.ascontiguousarray(stream, dtype=np.int64).tobytes()).hexdigest()[:16]


# --- the built-in sections ---


def _perplexity_plan(ctx: EvalContext) -> tuple[int, str, str]:
    s = ctx.settings
    windows = planned_windows(
        len(ctx.stream), s.context_lengths, s.strides, s.max_tokens, s.window_placement
    )
    share = "the whole split" if s.max_tokens is None else f"up to {s.max_tokens} tokens each"
    what = (
        f"lengths {s.context_lengths} x strides {s.strides}, {share}, {s.window_placement} over "
        f"{len(ctx.offsets) - 1} documents"
    )
    return windows, "windows", what


def _perplexity_run(ctx: EvalContext, progress: Progress) -> SectionResult:
    s = ctx.settings
    rows, positions, units = perplexity_by_context_length(
        ctx.scorer,
        ctx.tokens,
        s.context_lengths,
        ctx.count_bytes,
        s.max_tokens,
        s.batch_size,
        s.strides,
        ctx.offsets,
        s.window_placement,
        s.bootstrap,
        s.min_bin_tokens,
        progress,
    )
    return SectionResult(
        {"perplexity": [r.as_dict() for r in rows], "position_loss": positions},
        {"perplexity": units},
    )


def _streaming_applies(ctx: EvalContext) -> bool:
    enabled = ctx.settings.streaming.enabled
    return enabled is True or (enabled == "auto" and ctx.scorer.backend.ordered_stream)


def _segment_length(ctx: EvalContext) -> int:
    return ctx.settings.streaming.segment_length or ctx.train_length


def _streaming_plan(ctx: EvalContext) -> tuple[int, str, str]:
    segment = _segment_length(ctx)
    rows = max(1, min(ctx.settings.batch_size, (len(ctx.stream) - 1) // (segment + 1)))
    steps = min(
        -(-ctx.settings.streaming.max_tokens // (segment * rows)),
        max((len(ctx.stream) // rows - 1) // segment, 0),
    )
    return 2 * steps, "steps", f"segments of {segment} through model.step, carried then fresh"


def _streaming_run(ctx: EvalContext, progress: Progress) -> SectionResult:
    row, memory, units = streaming_perplexity(
        ctx.scorer,
        ctx.stream,
        ctx.offsets,
        _segment_length(ctx),
        ctx.settings.batch_size,
        ctx.settings.streaming.max_tokens,
        ctx.count_bytes,
        ctx.settings.bootstrap,
        progress,
    )
    return SectionResult(
        {"perplexity": [row.as_dict()], "streaming_memory": memory},
        {"perplexity": [units] if units else []},
    )


def _prefix_longest(ctx: EvalContext) -> int:
    return ctx.settings.prefix_ablation.max_length or max(ctx.settings.context_lengths)


def _prefix_plan(ctx: EvalContext) -> tuple[int, str, str]:
    p = ctx.settings.prefix_ablation
    max_prefix = max(_prefix_longest(ctx) - p.target_tokens, 0)
    prefixes = prefix_lengths(p.step, max_prefix)
    samples = len(sample_starts(len(ctx.stream), max_prefix, p.target_tokens, p.samples))
    return samples * len(prefixes), "samples", f"prefixes {prefixes}, {p.target_tokens} targets"


def _prefix_run(ctx: EvalContext, progress: Progress) -> SectionResult:
    rows = prefix_ablation(
        ctx.scorer,
        ctx.tokens,
        ctx.settings.prefix_ablation,
        _prefix_longest(ctx),
        ctx.settings.batch_size,
        ctx.offsets,
        ctx.settings.bootstrap,
        progress,
    )
    return SectionResult({"prefix_ablation": rows})


def _passkey_lengths(ctx: EvalContext) -> list[int]:
    return ctx.settings.passkey.lengths or ctx.settings.context_lengths


def _passkey_plan(ctx: EvalContext) -> tuple[int, str, str]:
    p = ctx.settings.passkey
    lengths = _passkey_lengths(ctx)
    trials = len(lengths) * len(p.depths) * p.trials
    return trials, "trials", f"lengths {lengths} x depths {list(p.depths)}, {p.trials} each"


def _passkey_run(ctx: EvalContext, progress: Progress) -> SectionResult:
    filler = ctx.stream[ctx.stream != ctx.tokenizer.eos_id]
    rows, units = passkey_grid(
        ctx.scorer,
        filler,
        ctx.tokenizer,
        ctx.settings.passkey,
        _passkey_lengths(ctx),
        ctx.settings.batch_size,
        ctx.settings.bootstrap.confidence,
        progress,
    )
    return SectionResult({"passkey": rows}, {"passkey": units})


def _fact_lengths(ctx: EvalContext) -> list[int]:
    return ctx.settings.fact_recall.lengths or [ctx.train_length]


def _fact_plan(ctx: EvalContext) -> tuple[int, str, str]:
    documents = len({f.document for f in ctx.planted_facts()})
    facts = min(ctx.settings.fact_recall.max_docs, documents)
    lengths = _fact_lengths(ctx)
    return facts * len(lengths), "facts", f"one per document from {facts}, lengths {lengths}"


def _fact_run(ctx: EvalContext, progress: Progress) -> SectionResult:
    buckets = ctx.datamodule.data_cfg.get("distances")  # the corpus's planted distances
    rows, units = fact_recall(
        ctx.scorer,
        ctx.planted_facts(),
        ctx.tokenizer,
        ctx.settings.fact_recall,
        _fact_lengths(ctx),
        ctx.settings.batch_size,
        sorted(buckets) if buckets else None,
        ctx.settings.bootstrap,
        progress,
    )
    return SectionResult({"fact_recall": rows}, {"fact_recall": units})


EVAL_SECTIONS: list[EvalSection] = [
    EvalSection("perplexity", lambda ctx: True, _perplexity_plan, _perplexity_run),
    EvalSection("streaming", _streaming_applies, _streaming_plan, _streaming_run),
    EvalSection(
        "prefix_ablation",
        lambda ctx: ctx.settings.prefix_ablation.enabled,
        _prefix_plan,
        _prefix_run,
    ),
    EvalSection("passkey", lambda ctx: ctx.settings.passkey.enabled, _passkey_plan, _passkey_run),
    EvalSection(
        "fact_recall",
        lambda ctx: ctx.settings.fact_recall.enabled and bool(ctx.planted_facts()),
        _fact_plan,
        _fact_run,
    ),
]


def register_eval_section(section: EvalSection) -> None:
    """Adds a section after the built-in ones (a second registration under one name replaces
    the first)."""
    EVAL_SECTIONS[:] = [s for s in EVAL_SECTIONS if s.name != section.name] + [section]
