"""Perplexity and bits per byte by context length, over windows of a token stream.

Protocol: windows of `length` input tokens start every `stride` tokens. Each target token is
scored exactly once, in the first window that contains it: with stride == length the windows
do not overlap; with a smaller stride every scored token (after the first window) has at
least length - stride tokens of context. Only whole windows are used.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
from torch.nn import functional as F

from longctx.errors import ConfigError


@dataclass
class PerplexityRow:
    context_length: int
    stride: int
    protocol: str  # "windows" (non-overlapping) | "sliding" (strided)
    tokens: int = 0
    bytes: int = 0
    loss: float | None = None  # mean NLL per token, nats
    ppl: float | None = None
    bpb: float | None = None  # bits per UTF-8 byte of the scored text
    skipped: str | None = None  # why this length was not evaluated

    def as_dict(self) -> dict:
        return asdict(self)


def window_plan(n_tokens: int, length: int, stride: int, max_scored: int) -> list[tuple[int, int]]:
    """(begin, first_scored_offset) of each window; targets of window b are tokens[b+1 : b+length+1]."""
    plan, scored, begin, last_scored = [], 0, 0, 0
    while begin + length + 1 <= n_tokens and scored < max_scored:
        first = max(last_scored - begin, 0)
        plan.append((begin, first))
        scored += length - first
        last_scored = begin + length
        begin += stride
    return plan


@torch.no_grad()
def score_stream(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    length: int,
    stride: int,
    max_scored: int,
    batch_size: int,
    decode: Callable[[list[int]], str],
) -> PerplexityRow:
    protocol = "windows" if stride == length else "sliding"
    row = PerplexityRow(context_length=length, stride=stride, protocol=protocol)
    plan = window_plan(len(tokens), length, stride, max_scored)
    if not plan:
        row.skipped = f"test stream has {len(tokens)} tokens, fewer than one window of {length + 1}"
        return row
    device = next(model.parameters()).device
    total_nll = 0.0
    for i in range(0, len(plan), batch_size):
        chunk = plan[i : i + batch_size]
        windows = torch.stack([tokens[b : b + length + 1] for b, _ in chunk]).to(device)
        logits = model(windows[:, :-1]).float()
        nll = F.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none")
        for row_nll, (begin, first), window in zip(nll, chunk, windows):
            total_nll += row_nll[first:].double().sum().item()
            row.tokens += length - first
            row.bytes += len(decode(window[1 + first :].tolist()).encode("utf-8"))
    row.loss = total_nll / row.tokens
    row.ppl = math.exp(min(row.loss, 700.0))
    row.bpb = total_nll / math.log(2) / max(row.bytes, 1)
    return row


def perplexity_by_context_length(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    lengths: Sequence[int],
    decode: Callable[[list[int]], str],
    max_scored: int = 65536,
    batch_size: int = 8,
    strides: Sequence[int | None] = (None,),
) -> list[PerplexityRow]:
    """One row per (length, stride); stride None means non-overlapping windows (stride = length)."""
    backend = model.backend
    rows = []
    for length in lengths:
        for stride in strides:
            stride_used = length if stride is None else min(stride, length)
            try:
                backend.check_sequence_length(length)
            except ConfigError as err:
                rows.append(PerplexityRow(length, stride_used, "windows" if stride_used == length else "sliding",
                                          skipped=str(err)))
                continue
            rows.append(score_stream(model, tokens, length, stride_used, max_scored, batch_size, decode))
    return rows
