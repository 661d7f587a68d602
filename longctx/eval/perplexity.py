"""Perplexity and bits per byte by context length, over windows of a token stream.

Protocol: windows of `length` input tokens start every `stride` tokens. Each target token is
scored exactly once, in the first window that contains it: with stride == length the windows
do not overlap ("windows"); with a smaller stride ("sliding") every scored token after the
first window has at least length - stride tokens of context. Only whole windows are used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from longctx.eval.position_loss import position_loss_rows
from longctx.eval.scoring import Scorer, Stopwatch
from longctx.eval.token_bytes import ByteCounter


@dataclass
class PerplexityRow:
    context_length: int
    stride: int
    protocol: str  # "windows" (non-overlapping) | "sliding" (strided) | "streaming" (carried state)
    tokens: int = 0
    bytes: int = 0
    loss: float | None = None  # mean NLL per token, nats
    ppl: float | None = None
    bpb: float | None = None  # bits per UTF-8 byte of the scored text
    seconds: float | None = None  # wall time of the forward passes
    peak_memory_mib: float | None = None  # CUDA allocator peak during them (None on CPU)
    skipped: str | None = None  # why this length was not evaluated

    def as_dict(self) -> dict:
        return asdict(self)

    def finish(self, total_nll: float) -> PerplexityRow:
        self.loss = total_nll / self.tokens
        self.ppl = math.exp(min(self.loss, 700.0))
        self.bpb = total_nll / math.log(2) / max(self.bytes, 1)
        return self


def window_plan(n_tokens: int, length: int, stride: int, max_scored: int) -> list[tuple[int, int]]:
    """(begin, first_scored_offset) of each window;
    targets of window b are tokens[b+1 : b+length+1]."""
    plan, scored, begin, last_scored = [], 0, 0, 0
    while begin + length + 1 <= n_tokens and scored < max_scored:
        first = max(last_scored - begin, 0)
        plan.append((begin, first))
        scored += length - first
        last_scored = begin + length
        begin += stride
    return plan


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


def score_windows(
    scorer: Scorer,
    tokens: torch.Tensor,
    length: int,
    stride: int,
    max_scored: int,
    batch_size: int,
    count_bytes: ByteCounter,
) -> tuple[PerplexityRow, np.ndarray, np.ndarray]:
    """The row, plus NLL sums and token counts per in-window position (for loss by position)."""
    row = PerplexityRow(context_length=length, stride=stride, protocol=protocol_of(length, stride))
    position_nll, position_count = np.zeros(length), np.zeros(length, dtype=np.int64)
    plan = window_plan(len(tokens), length, stride, max_scored)
    if not plan:
        row.skipped = f"test stream has {len(tokens)} tokens, fewer than one window of {length + 1}"
        return row, position_nll, position_count
    total_nll = 0.0
    with Stopwatch(scorer.device) as watch:
        for i in range(0, len(plan), batch_size):
            chunk = plan[i : i + batch_size]
            windows = torch.stack([tokens[b : b + length + 1] for b, _ in chunk])
            nll = scorer.nll(windows[:, :-1], windows[:, 1:])
            for row_nll, (_, first), window in zip(nll, chunk, windows):
                scored = row_nll[first:].numpy()
                total_nll += float(scored.sum())
                position_nll[first:] += scored
                position_count[first:] += 1
                row.tokens += length - first
                row.bytes += count_bytes(window[1 + first :])
    row.seconds, row.peak_memory_mib = watch.seconds, watch.peak_memory_mib
    return row.finish(total_nll), position_nll, position_count


def perplexity_by_context_length(
    scorer: Scorer,
    tokens: torch.Tensor,
    lengths: Sequence[int],
    count_bytes: ByteCounter,
    max_scored: int = 65536,
    batch_size: int = 8,
    strides: Sequence[Any] = (None,),
) -> tuple[list[PerplexityRow], list[dict]]:
    """Rows per (length, stride), and loss-by-position rows from the non-overlapping windows.

    A length the model refuses (a backend's max_len, learned positions) or the stream cannot fill
    is recorded with the reason.
    """
    rows, positions = [], []
    for length in lengths:
        for stride in dict.fromkeys(
            resolve_stride(s, length) for s in strides
        ):  # ordered, no duplicates
            refusal = scorer.refusal(length)
            if refusal:
                rows.append(
                    PerplexityRow(length, stride, protocol_of(length, stride), skipped=refusal)
                )
                continue
            row, position_nll, position_count = score_windows(
                scorer, tokens, length, stride, max_scored, batch_size, count_bytes
            )
            rows.append(row)
            if row.protocol == "windows" and row.skipped is None:
                positions.extend(position_loss_rows(length, position_nll, position_count))
    return rows, positions
