"""Streaming perplexity: state carried through `model.step` over consecutive segments.

This is how Transformer-XL and recurrent backends are meant to read long documents: the test
stream is cut into `batch` contiguous rows (OrderedStream, as in ordered training), each step
feeds the next segment of every row with the state left by the previous one, and a row's state
is reset where its segment starts a new document. Every scored token is predicted from all of
its document's earlier tokens that the mechanism's state still holds.

The same segments are also scored from a fresh state, and both losses are kept by position in
the segment (log-spaced bins): what the carried state (Transformer-XL's memory, a recurrent
state) buys shows at the first positions of a segment, where a fresh state has no context.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional as F

from longctx.core.state import reset_rows
from longctx.data.packing import OrderedStream
from longctx.eval.perplexity import PerplexityRow
from longctx.eval.position_loss import log_bins
from longctx.eval.scoring import Scorer, Stopwatch
from longctx.eval.token_bytes import ByteCounter


@torch.no_grad()
def streaming_perplexity(
    scorer: Scorer,
    tokens: np.ndarray,
    doc_offsets: np.ndarray,
    segment_length: int,
    batch_size: int,
    max_tokens: int,
    count_bytes: ByteCounter,
) -> tuple[PerplexityRow, list[dict]]:
    """The streaming row, and rows of loss by position in the segment with the carried state and
    with a fresh one (empty when the row is skipped)."""
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
        return row, []
    row.skipped = scorer.refusal(positions)
    if row.skipped:
        return row, []
    model, total_nll = scorer.model, 0.0
    carried_nll, fresh_nll, counts = (np.zeros(segment_length) for _ in range(3))
    state = model.init_state(n_rows)
    with Stopwatch(scorer.device) as watch:
        for batch in stream:
            inputs, targets = batch["input_ids"].to(scorer.device), batch["targets"]
            state = reset_rows(state, model.init_state(n_rows), batch["reset"].to(scorer.device))
            with scorer.autocast_context():
                logits, state = model.step(inputs, state)
            nll = F.cross_entropy(
                logits.float().transpose(1, 2), targets.to(scorer.device), reduction="none"
            )
            total_nll += float(nll.double().sum())
            row.tokens += targets.numel()
            row.bytes += count_bytes(targets)
            carried_nll += nll.double().sum(0).cpu().numpy()
            counts += targets.shape[0]
    row.seconds, row.peak_memory_mib = watch.seconds, watch.peak_memory_mib
    for batch in stream:  # untimed: the same segments from a fresh state
        with scorer.autocast_context():
            logits, _ = model.step(batch["input_ids"].to(scorer.device), model.init_state(n_rows))
        nll = F.cross_entropy(
            logits.float().transpose(1, 2), batch["targets"].to(scorer.device), reduction="none"
        )
        fresh_nll += nll.double().sum(0).cpu().numpy()
    return row.finish(total_nll), _by_position(segment_length, carried_nll, fresh_nll, counts)


def _by_position(
    segment_length: int, carried_nll: np.ndarray, fresh_nll: np.ndarray, counts: np.ndarray
) -> list[dict]:
    return [
        {
            "segment_length": segment_length,
            "position_start": start,
            "position_end": end,
            "tokens": int(counts[start:end].sum()),
            "loss_with_state": float(carried_nll[start:end].sum() / counts[start:end].sum()),
            "loss_fresh_state": float(fresh_nll[start:end].sum() / counts[start:end].sum()),
        }
        for start, end in log_bins(segment_length)
        if counts[start:end].sum()
    ]
