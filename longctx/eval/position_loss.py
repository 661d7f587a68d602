"""Loss by token position inside evaluation windows, in log-spaced bins.

Position p is the p-th input of a window: its logits predict the next token with p + 1 tokens
of context. A loss that keeps falling towards the last bins means distant context is used; a
flat or rising tail (past the training length: extrapolation failing) means it is not.

The first bins hold one or two tokens per window: each row says how many tokens and documents
it rests on, carries a confidence interval (documents resampled), and is flagged `few_tokens`
below `eval.min_bin_tokens` tokens; plots draw flagged bins hollow.
"""

from __future__ import annotations

import numpy as np

from longctx.eval.documents import DocumentSums
from longctx.eval.stats import Bootstrap


def log_bins(length: int) -> list[tuple[int, int]]:
    """[0, 1), [1, 2), [2, 4), [4, 8), ... with the last bin ending at `length`."""
    bins, start = [], 0
    while start < length:
        end = min(max(2 * start, 1), length)
        bins.append((start, end))
        start = end
    return bins


def bin_index(length: int) -> np.ndarray:
    """The log bin of each position 0 .. length - 1."""
    index = np.zeros(length, dtype=np.int64)
    for i, (start, end) in enumerate(log_bins(length)):
        index[start:end] = i
    return index


def position_loss_rows(
    length: int,
    sums: DocumentSums,
    bins: list[tuple[int, int]],
    bootstrap: Bootstrap,
    min_bin_tokens: int,
) -> list[dict]:
    rows = []
    for column, ((start, end), (loss, low, high)) in enumerate(
        zip(bins, sums.intervals(bootstrap))
    ):
        tokens = int(sums.tokens[:, column].sum())
        if tokens:
            rows.append(
                {
                    "context_length": length,
                    "position_start": start,
                    "position_end": end,
                    "tokens": tokens,
                    "documents": int((sums.tokens[:, column] > 0).sum()),
                    "loss": loss,
                    "loss_low": low,
                    "loss_high": high,
                    "few_tokens": tokens < min_bin_tokens,
                }
            )
    return rows
