"""Loss by token position inside evaluation windows, in log-spaced bins.

Position p is the p-th input of a window: its logits predict the next token with p + 1 tokens
of context. A loss that keeps falling towards the last bins means distant context is used; a
flat or rising tail (past the training length: extrapolation failing) means it is not.
"""

from __future__ import annotations

import numpy as np


def log_bins(length: int) -> list[tuple[int, int]]:
    """[0, 1), [1, 2), [2, 4), [4, 8), ... with the last bin ending at `length`."""
    bins, start = [], 0
    while start < length:
        end = min(max(2 * start, 1), length)
        bins.append((start, end))
        start = end
    return bins


def position_loss_rows(length: int, nll_sum: np.ndarray, count: np.ndarray) -> list[dict]:
    rows = []
    for start, end in log_bins(length):
        tokens = int(count[start:end].sum())
        if tokens:
            rows.append(
                {
                    "context_length": length,
                    "position_start": start,
                    "position_end": end,
                    "tokens": tokens,
                    "loss": float(nll_sum[start:end].sum() / tokens),
                }
            )
    return rows
