"""Perplexity and bits per byte by context length, over windows of the test split's token stream.

Protocol: windows of `length` input tokens start at multiples of `stride`; each target token is
scored at most once. With stride == length the windows do not overlap ("windows"); with a
smaller stride ("sliding") every scored token has at least length - stride tokens of context.
Only whole windows are used.

Placement: `spread` scores windows evenly spaced over the whole split, so each document gets a
share of the scored tokens that follows its length and no single document (the first one, say)
decides the figure; a sliding window then scores its last `stride` targets. `prefix` scores the
split's first windows (the first one in full). `max_scored=None` scores every window.

Each row carries a confidence interval with documents as the resampled units (stats.py), the
number of windows and documents scored, the share of the split's targets scored, and a digest
of the window plan: two runs with equal digests on the same split were scored on identical
tokens, so their difference can be paired document by document (report.py).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from longctx.eval.documents import DocumentSums
from longctx.eval.position_loss import bin_index, log_bins, position_loss_rows
from longctx.eval.progress import Progress
from longctx.eval.scoring import Scorer, Stopwatch
from longctx.eval.stats import Bootstrap
from longctx.eval.token_bytes import ByteCounter


@dataclass
class PerplexityRow:
    context_length: int
    stride: int
    protocol: str  # "windows" (non-overlapping) | "sliding" (strided) | "streaming" (carried state)
    tokens: int = 0
    bytes: int = 0
    loss: float | None = None  # mean NLL per token, nats
    loss_low: float | None = None  # confidence interval (eval.bootstrap), documents resampled
    loss_high: float | None = None
    ppl: float | None = None
    ppl_low: float | None = None
    ppl_high: float | None = None
    bpb: float | None = None  # bits per UTF-8 byte of the scored text
    bpb_low: float | None = None
    bpb_high: float | None = None
    windows: int = 0  # windows (streaming: segments x rows) scored
    documents: int = 0  # test documents with at least one scored token
    split_share: float | None = None  # scored targets / targets the split offers
    plan_digest: str | None = None  # identical digests on one split: identical scored tokens
    seconds: float | None = None  # wall time of the forward passes
    peak_memory_mib: float | None = None  # CUDA allocator peak during them (None on CPU)
    skipped: str | None = None  # why this length was not evaluated

    def as_dict(self) -> dict:
        return asdict(self)

    def finish(self, sums: DocumentSums, n_targets: int, bootstrap: Bootstrap) -> PerplexityRow:
        """Loss, perplexity and bits per byte with their intervals, from per-document sums."""
        loss, low, high = sums.total_interval(bootstrap)
        self.tokens, self.bytes = int(sums.tokens.sum()), int(sums.bytes.sum())
        self.documents = len(sums.scored())
        self.loss, self.loss_low, self.loss_high = loss, low, high
        self.ppl, self.ppl_low, self.ppl_high = (_exp(v) for v in (loss, low, high))
        self.bpb, self.bpb_low, self.bpb_high = sums.bits_per_byte(bootstrap)
        self.split_share = self.tokens / max(n_targets, 1)
        return self


def _exp(value: float | None) -> float | None:
    return None if value is None else math.exp(min(value, 700.0))


def resolve_stride(stride: Any, length: int) -> int:
    """null -> length (non-overlapping); a fraction in (0, 1) -> that share of length;
    an int -> itself."""
    if stride is None:
        return length
    if isinstance(stride, float):
        return max(1, round(stride * length))
    return min(int(stride), length)


def protocol_of(length: int, stride: int) -> str:
    return "windows" if stride == length else "sliding"


def window_plan(
    n_tokens: int, length: int, stride: int, max_scored: int | None, placement: str = "spread"
) -> list[tuple[int, int]]:
    """(begin, first_scored_offset) of each window;
    targets of window b are tokens[b+1 : b+length+1], scored from offset `first` on."""
    begins = range(0, max(n_tokens - length, 0), stride)  # b + length + 1 <= n_tokens
    if placement == "prefix":
        plan, scored, last_scored = [], 0, 0
        for begin in begins:
            if max_scored is not None and scored >= max_scored:
                break
            first = max(last_scored - begin, 0)
            plan.append((begin, first))
            scored += length - first
            last_scored = begin + length
        return plan
    first = length - stride
    count = len(begins)
    if max_scored is not None:
        count = min(count, math.ceil(max_scored / (length - first)))
    if count == 0:
        return []
    chosen = np.unique(np.linspace(0, len(begins) - 1, count).round().astype(np.int64))
    return [(begins[i], first) for i in chosen]


def plan_digest(plan: list[tuple[int, int]], length: int) -> str:
    text = json.dumps([length, [list(p) for p in plan]])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class ScoredWindows:
    row: PerplexityRow
    sums: DocumentSums  # one column per loss-by-position bin
    bins: list[tuple[int, int]]


def score_windows(
    scorer: Scorer,
    tokens: torch.Tensor,
    length: int,
    stride: int,
    max_scored: int | None,
    batch_size: int,
    count_bytes: ByteCounter,
    offsets: np.ndarray | None = None,
    placement: str = "spread",
    bootstrap: Bootstrap | None = None,
    progress: Progress | None = None,
) -> ScoredWindows:
    """One row, with per-document sums by in-window position bin (for loss by position).

    `offsets`: where each test document starts in `tokens`, plus its length (None: one document).
    """
    bootstrap = bootstrap or Bootstrap()
    offsets = np.array([0, len(tokens)]) if offsets is None else np.asarray(offsets)
    row = PerplexityRow(context_length=length, stride=stride, protocol=protocol_of(length, stride))
    bins = log_bins(length)
    sums = DocumentSums(offsets, columns=len(bins))
    plan = window_plan(len(tokens), length, stride, max_scored, placement)
    if not plan:
        row.skipped = f"test stream has {len(tokens)} tokens, fewer than one window of {length + 1}"
        return ScoredWindows(row, sums, bins)
    column_of = bin_index(length)
    with Stopwatch(scorer.device) as watch:
        for i in range(0, len(plan), batch_size):
            chunk = plan[i : i + batch_size]
            windows = torch.stack([tokens[b : b + length + 1] for b, _ in chunk])
            nll = scorer.nll(windows[:, :-1], windows[:, 1:])
            for row_nll, (begin, first), window in zip(nll, chunk, windows):
                sums.add(
                    np.arange(begin + 1 + first, begin + 1 + length),
                    row_nll[first:].numpy(),
                    column_of[first:],
                    window[1 + first :],
                    count_bytes,
                )
            if progress:
                progress.advance(len(chunk))
    row.seconds, row.peak_memory_mib = watch.seconds, watch.peak_memory_mib
    row.windows, row.plan_digest = len(plan), plan_digest(plan, length)
    row.finish(sums, len(tokens) - 1, bootstrap)
    return ScoredWindows(row, sums, bins)


def planned_windows(
    n_tokens: int, lengths: Sequence[int], strides: Sequence[Any], max_scored, placement: str
) -> int:
    """Windows that perplexity_by_context_length will score (for progress and its ETA)."""
    return sum(
        len(window_plan(n_tokens, length, stride, max_scored, placement))
        for length in lengths
        for stride in dict.fromkeys(resolve_stride(s, length) for s in strides)
    )


def perplexity_by_context_length(
    scorer: Scorer,
    tokens: torch.Tensor,
    lengths: Sequence[int],
    count_bytes: ByteCounter,
    max_scored: int | None = 65536,
    batch_size: int = 8,
    strides: Sequence[Any] = (None,),
    offsets: np.ndarray | None = None,
    placement: str = "spread",
    bootstrap: Bootstrap | None = None,
    min_bin_tokens: int = 256,
    progress: Progress | None = None,
) -> tuple[list[PerplexityRow], list[dict], list[dict]]:
    """Rows per (length, stride); loss-by-position rows from the non-overlapping windows; and
    the per-document scores of each scored row (units.json, for paired comparisons).

    A length the model refuses (a backend's max_len, learned positions) or the stream cannot fill
    is recorded with the reason.
    """
    bootstrap = bootstrap or Bootstrap()
    rows, positions, units = [], [], []
    for length in lengths:
        for stride in dict.fromkeys(
            resolve_stride(s, length) for s in strides
        ):  # ordered, no duplicates
            refusal = scorer.refusal(length)
            if refusal:
                rows.append(
                    PerplexityRow(length, stride, protocol_of(length, stride), skipped=refusal)
                )
                if progress:
                    progress.advance(
                        len(window_plan(len(tokens), length, stride, max_scored, placement))
                    )
                continue
            scored = score_windows(
                scorer,
                tokens,
                length,
                stride,
                max_scored,
                batch_size,
                count_bytes,
                offsets,
                placement,
                bootstrap,
                progress,
            )
            row = scored.row
            rows.append(row)
            if row.skipped is not None:
                continue
            units.append(
                {
                    "context_length": length,
                    "stride": stride,
                    "protocol": row.protocol,
                    "plan_digest": row.plan_digest,
                    **scored.sums.units(),
                }
            )
            if row.protocol == "windows":
                positions.extend(
                    position_loss_rows(length, scored.sums, scored.bins, bootstrap, min_bin_tokens)
                )
    return rows, positions, units
