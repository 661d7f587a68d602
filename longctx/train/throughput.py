"""Lightning's ThroughputMonitor for longctx batches, instantiable from conf/callbacks."""

from __future__ import annotations

from lightning.pytorch.callbacks import ThroughputMonitor


def batch_rows(batch: dict) -> int:
    return batch["input_ids"].shape[0]


def batch_tokens(batch: dict) -> int:
    return batch["input_ids"].numel()


class BatchThroughput(ThroughputMonitor):
    """Samples, tokens (`train/lengths`), batches and, where the backend counts its FLOPs, MFU
    per second over the last `window_size` batches; cumulative counts from the first."""

    def __init__(self, window_size: int = 100, **kwargs):
        super().__init__(
            batch_size_fn=batch_rows, length_fn=batch_tokens, window_size=window_size, **kwargs
        )
