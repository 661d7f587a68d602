"""Streaming perplexity: state carried through `model.step` over consecutive segments.

This is how Transformer-XL and recurrent backends are meant to read long documents: the test
stream is cut into `batch` contiguous rows (OrderedStream, as in ordered training), each step
feeds the next segment of every row with the state left by the previous one, and a row's state
is reset where its segment starts a new document. Every scored token is predicted from all of
its document's earlier tokens that the mechanism's state still holds.

The same segments are also scored from a fresh state, and both losses are kept by position in
the segment (log-spaced bins): what the carried state (Transformer-XL's memory, a recurrent
state) buys shows at the first positions of a segment, where a fresh state has no context.
Both figures carry intervals with documents resampled; the gap's is paired (stats.py).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional as F

from longctx.core.state import reset_rows
from longctx.data.packing import OrderedStream
from longctx.eval.documents import DocumentSums
from longctx.eval.perplexity import PerplexityRow
from longctx.eval.position_loss import bin_index, log_bins
from longctx.eval.progress import Progress
from longctx.eval.scoring import Scorer, Stopwatch
from longctx.eval.stats import Bootstrap, ratio_intervals
from longctx.eval.token_bytes import ByteCounter


def stream_positions(n_tokens: int, n_rows: int, segment_length: int, step: int) -> np.ndarray:
    """Stream positions [rows, segment] of the targets of OrderedStream's `step`-th batch: rows
    are consecutive slices of the stream, each advancing one segment per step."""
    row_starts = np.arange(n_rows) * (n_tokens // n_rows)
    return row_starts[:, None] + step * segment_length + 1 + np.arange(segment_length)


@torch.no_grad()
def streaming_perplexity(
    scorer: Scorer,
    tokens: np.ndarray,
    doc_offsets: np.ndarray,
    segment_length: int,
    batch_size: int,
    max_tokens: int,
    count_bytes: ByteCounter,
    bootstrap: Bootstrap | None = None,
    progress: Progress | None = None,
) -> tuple[PerplexityRow, list[dict], dict | None]:
    """The streaming row, rows of loss by position in the segment with the carried state and with
    a fresh one (empty when the row is skipped), and the row's per-document scores."""
    bootstrap = bootstrap or Bootstrap()
    row = PerplexityRow(context_length=segment_length, stride=segment_length, protocol="streaming")
    n_rows = max(1, min(batch_size, (len(tokens) - 1) // (segment_length + 1)))
    stream = OrderedStream(
        tokens,
        doc_offsets,
        segment_length,
        n_rows,
        max_batches=math.ceil(max_tokens / (segment_length * n_rows)),
        rank=0,
        world_size=1,
    )
    try:
        positions = len(stream) * segment_length  # positions each row's state advances through
    except ValueError as err:  # the stream cannot fill one segment per row
        row.skipped = str(err)
        return row, [], None
    row.skipped = scorer.refusal(positions)
    if row.skipped:
        return row, [], None
    model, bins = scorer.model, log_bins(segment_length)
    column = np.broadcast_to(bin_index(segment_length), (n_rows, segment_length)).reshape(-1)
    carried, fresh = DocumentSums(doc_offsets, len(bins)), DocumentSums(doc_offsets, len(bins))
    state = model.init_state(n_rows)
    with Stopwatch(scorer.device) as watch:
        for step, batch in enumerate(stream):
            inputs, targets = batch["input_ids"].to(scorer.device), batch["targets"]
            where = stream_positions(len(tokens), n_rows, segment_length, step)
            if not np.array_equal(tokens[where], targets.numpy()):
                raise RuntimeError("OrderedStream's layout changed: update stream_positions")
            state = reset_rows(state, model.init_state(n_rows), batch["reset"].to(scorer.device))
            scorer.forward_tokens += inputs.numel()
            with scorer.autocast_context():
                logits, state = model.step(inputs, state)
            nll = F.cross_entropy(
                logits.float().transpose(1, 2), targets.to(scorer.device), reduction="none"
            )
            carried.add(
                where.reshape(-1),
                nll.double().cpu().numpy().reshape(-1),
                column,
                targets.reshape(-1),
                count_bytes,
            )
            if progress:
                progress.advance()
    row.seconds, row.peak_memory_mib = watch.seconds, watch.peak_memory_mib
    for step, batch in enumerate(stream):  # untimed: the same segments from a fresh state
        scorer.forward_tokens += batch["input_ids"].numel()
        with scorer.autocast_context():
            logits, _ = model.step(batch["input_ids"].to(scorer.device), model.init_state(n_rows))
        nll = F.cross_entropy(
            logits.float().transpose(1, 2), batch["targets"].to(scorer.device), reduction="none"
        )
        where = stream_positions(len(tokens), n_rows, segment_length, step)
        fresh.add(where.reshape(-1), nll.double().cpu().numpy().reshape(-1), column)
        if progress:
            progress.advance()
    row.windows = len(stream) * n_rows
    row.finish(carried, len(tokens) - 1, bootstrap)
    units = {
        "context_length": segment_length,
        "stride": segment_length,
        "protocol": "streaming",
        "plan_digest": None,
        **carried.units(),
    }
    return row, _by_position(bins, carried, fresh, bootstrap), units


def _by_position(
    bins: list[tuple[int, int]], carried: DocumentSums, fresh: DocumentSums, bootstrap: Bootstrap
) -> list[dict]:
    docs = carried.scored()
    with_state = carried.intervals(bootstrap)
    without = fresh.intervals(bootstrap)
    gaps = ratio_intervals((fresh.nll - carried.nll)[docs], carried.tokens[docs], bootstrap)
    rows = []
    for i, (start, end) in enumerate(bins):
        tokens = int(carried.tokens[:, i].sum())
        if not tokens:
            continue
        rows.append(
            {
                "segment_length": bins[-1][1],
                "position_start": start,
                "position_end": end,
                "tokens": tokens,
                "documents": int((carried.tokens[:, i] > 0).sum()),
                "loss_with_state": with_state[i][0],
                "loss_fresh_state": without[i][0],
                "gap": gaps[i][0],
                "gap_low": gaps[i][1],
                "gap_high": gaps[i][2],
            }
        )
    return rows
