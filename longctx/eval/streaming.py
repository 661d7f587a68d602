"""Streaming perplexity: state carried through `model.step` over consecutive segments.

This is how Transformer-XL and recurrent backends are meant to read long documents: the test
stream is cut into `batch` contiguous rows (OrderedStream, as in ordered training), each step
feeds the next segment of every row with the state left by the previous one, and a row's state
is reset where its segment starts a new document. Every scored token is predicted from all of
its document's earlier tokens that the mechanism's state still holds.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional as F

from longctx.data.packing import OrderedStream
from longctx.eval.perplexity import PerplexityRow
from longctx.eval.scoring import Scorer, Stopwatch
from longctx.eval.token_bytes import ByteCounter
from longctx.train.stream_state import reset_rows


@torch.no_grad()
def streaming_perplexity(
    scorer: Scorer,
    tokens: np.ndarray,
    doc_offsets: np.ndarray,
    segment_length: int,
    batch_size: int,
    max_tokens: int,
    count_bytes: ByteCounter,
) -> PerplexityRow:
    row = PerplexityRow(context_length=segment_length, stride=segment_length, protocol="streaming")
    n_rows = max(1, min(batch_size, (len(tokens) - 1) // (segment_length + 1)))
    stream = OrderedStream(tokens, doc_offsets, segment_length, n_rows,
                           max_batches=math.ceil(max_tokens / (segment_length * n_rows)), rank=0, world_size=1)
    try:
        positions = len(stream) * segment_length  # positions each row's state advances through
    except ValueError as err:  # the stream cannot fill one segment per row
        row.skipped = str(err)
        return row
    row.skipped = scorer.refusal(positions)
    if row.skipped:
        return row
    model, total_nll = scorer.model, 0.0
    state = model.init_state(n_rows)
    with Stopwatch(scorer.device) as watch:
        for batch in stream:
            inputs, targets = batch["input_ids"].to(scorer.device), batch["targets"]
            state = reset_rows(state, model.init_state(n_rows), batch["reset"].to(scorer.device))
            with scorer.autocast_context():
                logits, state = model.step(inputs, state)
            nll = F.cross_entropy(logits.float().transpose(1, 2), targets.to(scorer.device), reduction="none")
            total_nll += float(nll.double().sum())
            row.tokens += targets.numel()
            row.bytes += count_bytes(targets)
    row.seconds, row.peak_memory_mib = watch.seconds, watch.peak_memory_mib
    return row.finish(total_nll)
