"""The perplexity protocol: every target scored once, values equal to a plain forward."""
from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from conftest import model_config
from longctx import build_model
from longctx.eval.perplexity import perplexity_by_context_length, window_plan


@pytest.mark.parametrize("length,stride", [(10, 10), (10, 4), (7, 1)])
def test_every_target_is_scored_exactly_once(length, stride):
    plan = window_plan(200, length, stride, max_scored=10**6)
    scored = [b + 1 + t for b, first in plan for t in range(first, length)]
    assert len(scored) == len(set(scored))
    assert scored == list(range(1, plan[-1][0] + length + 1))
    assert all(first == 0 or length - first <= stride for _, first in plan)


def test_perplexity_equals_a_plain_forward_over_the_same_windows():
    torch.manual_seed(0)
    model = build_model(model_config("full"), 257).eval()
    tokens = torch.randint(0, 256, (500,))
    decode = lambda ids: bytes(ids).decode("utf-8", errors="replace")  # noqa: E731
    (row,) = perplexity_by_context_length(model, tokens, [32], decode, max_scored=10**6, batch_size=3)
    windows = tokens[: (499 // 32) * 32 + 1]
    nll = []
    with torch.no_grad():
        for b in range(0, len(windows) - 32, 32):
            logits = model(windows[None, b:b + 32])
            nll.append(F.cross_entropy(logits[0], windows[b + 1:b + 33], reduction="sum"))
    expected = torch.stack(nll).sum().item() / (32 * len(nll))
    assert row.tokens == 32 * len(nll)
    assert row.loss == pytest.approx(expected, rel=1e-6)
    assert row.bpb == pytest.approx(row.loss * row.tokens / math.log(2) / row.bytes, rel=1e-12)


def test_lengths_beyond_the_stream_are_skipped_with_a_reason():
    model = build_model(model_config("full"), 257).eval()
    (row,) = perplexity_by_context_length(model, torch.zeros(50, dtype=torch.long), [64], lambda ids: "x")
    assert row.ppl is None and "fewer than one window" in row.skipped
