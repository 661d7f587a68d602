"""Is the bench's clock honest? Its SDPA figure next to a plain `timeit` of the same call."""

from __future__ import annotations

import dataclasses
import statistics
import timeit
from typing import Any

import torch
from torch.nn import functional as F

from longctx.bench.config import BASELINE, DTYPES, Settings
from longctx.bench.isolation import IsolatedRunner

TOLERANCE = 0.2  # the two figures must agree within 20%


def plain_timeit_ms(settings: Settings, seq_len: int, dtype: str) -> float:
    """Median ms of SDPA fwd+bwd (loss = out.sum()) timed by timeit in this process."""
    t = settings.template
    shape = (t.batch, t.heads, seq_len, t.head_dim)
    q, k, v = (
        torch.randn(shape, dtype=DTYPES[dtype], device=t.device, requires_grad=True)
        for _ in range(3)
    )

    def free_gradients() -> None:
        q.grad = k.grad = v.grad = None

    def call() -> None:
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
        if q.is_cuda:
            torch.cuda.synchronize()

    timer = timeit.Timer(call, setup=free_gradients)
    if t.warmup:
        timer.timeit(number=t.warmup)
    return statistics.median(timer.repeat(repeat=t.repeats, number=1)) * 1e3


def sanity_check(settings: Settings, runner: IsolatedRunner, timeout_s: float) -> dict[str, Any]:
    seq_len, dtype = settings.lengths[0], settings.dtypes[0]
    config = dataclasses.replace(
        settings.template,
        subject=BASELINE,
        kind="baseline",
        mode="fwd_bwd",
        dtype=dtype,
        seq_len=seq_len,
    )
    row = runner.run(config, timeout_s)
    if row["status"] != "ok":
        return {"bench_row": row, "agree": False}
    timeit_ms = plain_timeit_ms(settings, seq_len, dtype)
    relative = row["time_ms"] / timeit_ms - 1
    return {
        "call": f"F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward(), "
        f"B={config.batch} H={config.heads} N={seq_len} Dh={config.head_dim} {dtype}",
        "bench_ms": row["time_ms"],
        "timeit_ms": timeit_ms,
        "relative_difference": relative,
        "agree": abs(relative) <= TOLERANCE,
        "bench_row": row,
    }
