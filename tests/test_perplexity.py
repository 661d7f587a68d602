"""The perplexity protocol: every target scored once, values equal to independent computations,
bits per byte over the UTF-8 bytes of the scored text, loss by position from the same windows,
windows spread over the whole split, and per-document intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import model_config
from test_eval import InductionLM
from tokenizers import Tokenizer as HFTokenizerModel
from tokenizers import decoders, models, pre_tokenizers, trainers
from torch.nn import functional as F

from longctx import build_model
from longctx.data.tokenizer import EOS_TOKEN, ByteTokenizer, HFTokenizer
from longctx.eval.perplexity import (
    perplexity_by_context_length,
    resolve_stride,
    score_windows,
    window_plan,
)
from longctx.eval.position_loss import log_bins
from longctx.eval.scoring import Scorer
from longctx.eval.token_bytes import byte_counter

TEXT = "A" + "Ünïcödé wörds — naïve café, 東京 and ascii text. " * 12  # starts with one ASCII token


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(model_config("full"), 257).eval()


def byte_tokens(text: str = TEXT) -> torch.Tensor:
    return torch.tensor(ByteTokenizer().encode(text))


@pytest.mark.parametrize("length,stride", [(10, 10), (10, 4), (7, 1)])
def test_every_target_is_scored_exactly_once(length, stride):
    plan = window_plan(200, length, stride, max_scored=10**6, placement="prefix")
    scored = [b + 1 + t for b, first in plan for t in range(first, length)]
    assert len(scored) == len(set(scored))
    assert scored == list(range(1, plan[-1][0] + length + 1))
    # Strided: every scored token after the first window
    # has at least length - stride tokens of context.
    assert all(first == 0 or first >= length - stride for _, first in plan[1:])


@pytest.mark.parametrize("length,stride", [(10, 10), (10, 4), (7, 1)])
def test_spread_windows_score_every_target_once_when_unbounded(length, stride):
    plan = window_plan(200, length, stride, max_scored=None)
    scored = [b + 1 + t for b, first in plan for t in range(first, length)]
    assert len(scored) == len(set(scored))
    # Every target from the first with length - stride tokens of context to the last whole window.
    assert scored == list(range(1 + length - stride, plan[-1][0] + length + 1))
    assert all(first == length - stride for _, first in plan)


def test_spread_windows_are_evenly_spaced_over_the_whole_stream():
    plan = window_plan(10_000, 100, 100, max_scored=1000)
    begins = [b for b, _ in plan]
    assert len(plan) == 10 and begins[0] == 0 and begins[-1] == 9800  # the last whole window
    gaps = np.diff(begins)
    assert gaps.max() - gaps.min() <= 100  # one candidate window of rounding
    assert window_plan(10_000, 100, 100, 1000, placement="prefix")[-1][0] == 900


def test_strides_resolve_to_tokens():
    assert resolve_stride(None, 512) == 512
    assert resolve_stride(0.5, 512) == 256
    assert resolve_stride(64, 512) == 64
    assert resolve_stride(1024, 512) == 512


def test_perplexity_equals_a_plain_forward_over_the_same_windows(model):
    tokens = torch.randint(0, 256, (500,), generator=torch.Generator().manual_seed(1))
    (row,), _, _ = perplexity_by_context_length(
        Scorer(model), tokens, [32], byte_counter(ByteTokenizer()), max_scored=10**6, batch_size=3
    )
    nll = []
    with torch.no_grad():
        for b in range(0, len(tokens) - 32, 32):
            logits = model(tokens[None, b : b + 32])
            nll.append(F.cross_entropy(logits[0], tokens[b + 1 : b + 33], reduction="sum"))
    expected = torch.stack(nll).sum().item() / (32 * len(nll))
    assert row.protocol == "windows" and row.tokens == 32 * len(nll)
    assert row.loss == pytest.approx(expected, rel=1e-6)
    assert row.bpb == pytest.approx(row.loss * row.tokens / math.log(2) / row.bytes, rel=1e-12)


def test_stride_one_gives_every_later_token_a_full_window(model):
    """Independent form: tokens 1..L from the first window,
    then token t from the L tokens before it."""
    tokens, length = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(2)), 8
    row = score_windows(
        Scorer(model),
        tokens,
        length,
        1,
        10**6,
        4,
        byte_counter(ByteTokenizer()),
        placement="prefix",
    ).row
    with torch.no_grad():
        nll = list(
            F.cross_entropy(
                model(tokens[None, :length])[0], tokens[1 : length + 1], reduction="none"
            )
        )
        for t in range(length + 1, len(tokens)):
            nll.append(
                F.cross_entropy(model(tokens[None, t - length : t])[0, -1:], tokens[t : t + 1])[
                    None
                ][0]
            )
    assert row.protocol == "sliding" and row.tokens == len(tokens) - 1
    assert row.loss == pytest.approx(torch.stack(nll).mean().item(), rel=1e-6)


def tiny_bpe() -> HFTokenizer:
    model = HFTokenizerModel(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    model.train_from_iterator([TEXT], trainer=trainer)
    return HFTokenizer(model, name="bpe", eos_token=EOS_TOKEN)


@pytest.mark.parametrize("tokenizer", [ByteTokenizer(), tiny_bpe()], ids=["byte", "bpe"])
def test_bits_per_byte_counts_the_utf8_bytes_of_the_scored_text(tokenizer):
    """Per-token byte counts add up to the scored text's UTF-8 bytes, even where (byte tokenizer)
    sliding windows start inside multi-byte characters and a per-window decode would miscount."""
    ids, length, stride = tokenizer.encode(TEXT), 16, 5
    # The last window ends the stream, and the stream ends on a character boundary.
    n = next(
        n
        for n in range(len(ids) - 1, length, -1)
        if (n - 1 - length) % stride == 0
        and tokenizer.decode(ids[:n]) + tokenizer.decode(ids[n:]) == TEXT
    )
    plan = window_plan(n, length, stride, 10**6, placement="prefix")
    assert plan[-1][0] + length + 1 == n
    if isinstance(tokenizer, ByteTokenizer):
        assert any(
            tokenizer.decode(ids[:k]) + tokenizer.decode(ids[k:]) != TEXT
            for k in (b + 1 + f for b, f in plan)
        )
    scorer = Scorer(InductionLM(vocab_size=tokenizer.vocab_size))
    row = score_windows(
        scorer,
        torch.tensor(ids[:n]),
        length,
        stride,
        10**6,
        8,
        byte_counter(tokenizer),
        placement="prefix",
    ).row
    assert row.tokens == n - 1
    assert (
        row.bytes
        == len(tokenizer.decode(ids[1:n]).encode("utf-8"))
        == len(TEXT.encode("utf-8")) - 1 - len(tokenizer.decode(ids[n:]).encode("utf-8"))
    )


def test_eos_is_not_text():
    ids = torch.tensor([104, 105, 256, 106])
    assert byte_counter(ByteTokenizer())(ids) == 3


def test_loss_by_position_matches_per_window_forwards(model):
    tokens, length = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(3)), 16
    _, positions, _ = perplexity_by_context_length(
        Scorer(model),
        tokens,
        [length],
        byte_counter(ByteTokenizer()),
        max_scored=10**6,
        batch_size=5,
    )
    assert [(p["position_start"], p["position_end"]) for p in positions] == [
        (0, 1),
        (1, 2),
        (2, 4),
        (4, 8),
        (8, 16),
    ]
    with torch.no_grad():
        per_position = torch.stack(
            [
                F.cross_entropy(
                    model(tokens[None, b : b + length])[0],
                    tokens[b + 1 : b + length + 1],
                    reduction="none",
                )
                for b in range(0, len(tokens) - length, length)
            ]
        )
    for p in positions:
        expected = per_position[:, p["position_start"] : p["position_end"]]
        assert p["tokens"] == expected.numel()
        assert p["loss"] == pytest.approx(expected.mean().item(), rel=1e-6)


def test_log_bins_cover_every_position_once():
    for length in (1, 2, 5, 16, 100):
        bins = log_bins(length)
        covered = [p for start, end in bins for p in range(start, end)]
        assert covered == list(range(length))


def test_lengths_beyond_the_stream_or_the_backend_are_skipped_with_a_reason(model):
    rows, _, _ = perplexity_by_context_length(
        Scorer(model),
        torch.zeros(50, dtype=torch.long),
        [64],
        byte_counter(ByteTokenizer()),
        strides=[None, 0.5],
    )
    assert [r.protocol for r in rows] == ["windows", "sliding"]
    assert all(r.ppl is None and "fewer than one window" in r.skipped for r in rows)
    limited = build_model(
        model_config("full", None, "model.position=learned", "context_length=32"), 257
    ).eval()
    (row,), _, _ = perplexity_by_context_length(
        Scorer(limited), torch.zeros(500, dtype=torch.long), [64], byte_counter(ByteTokenizer())
    )
    assert row.ppl is None and row.skipped


def test_scored_tokens_are_capped_by_max_tokens(model):
    tokens = torch.randint(0, 256, (1000,), generator=torch.Generator().manual_seed(4))
    for placement in ("spread", "prefix"):
        (row,), _, _ = perplexity_by_context_length(
            Scorer(model),
            tokens,
            [16],
            byte_counter(ByteTokenizer()),
            max_scored=100,
            placement=placement,
        )
        assert 100 <= row.tokens < 116 and row.windows == 7
        assert np.isfinite(row.loss)


def outlier_corpus(documents: int = 12, length: int = 600) -> tuple[torch.Tensor, np.ndarray]:
    """A test stream whose first document is random bytes and whose others repeat a phrase:
    the induction model cannot predict the first and predicts the others almost perfectly."""
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 256, 2 * length)]
    for d in range(1, documents):
        phrase = rng.integers(0, 256, 20)
        docs.append(np.resize(phrase, length + 10 * d))  # lengths differ
    stream, offsets = [], [0]
    for doc in docs:
        stream.extend(doc.tolist() + [ByteTokenizer.eos_id])
        offsets.append(len(stream))
    return torch.tensor(stream), np.array(offsets)


def test_spread_windows_cover_every_document_where_a_prefix_sees_only_the_outlier():
    tokens, offsets = outlier_corpus()
    scorer, count = Scorer(InductionLM()), byte_counter(ByteTokenizer())
    rows = {}
    for placement in ("prefix", "spread"):
        (rows[placement],), _, _ = perplexity_by_context_length(
            scorer, tokens, [50], count, max_scored=1200, offsets=offsets, placement=placement
        )
    prefix, spread = rows["prefix"], rows["spread"]
    assert prefix.documents == 1 and prefix.loss > 4.0  # the random document: ln(257) ~ 5.5
    assert spread.documents == len(offsets) - 1  # every test document
    assert spread.loss < prefix.loss - 1.0  # the repeated phrases, predictable after a period
    assert spread.tokens == prefix.tokens == 1200
    assert spread.split_share == pytest.approx(1200 / (len(tokens) - 1))
    assert spread.plan_digest != prefix.plan_digest
    # The interval is over documents: the outlier document makes it wide, but it holds the loss.
    assert spread.loss_low < spread.loss < spread.loss_high
    assert spread.ppl_low == pytest.approx(math.exp(spread.loss_low))


def test_per_document_sums_add_up_to_the_row():
    tokens, offsets = outlier_corpus()
    (row,), positions, (units,) = perplexity_by_context_length(
        Scorer(InductionLM()),
        tokens,
        [50],
        byte_counter(ByteTokenizer()),
        max_scored=None,
        offsets=offsets,
    )
    assert units["documents"] == list(range(len(offsets) - 1))
    assert sum(units["tokens"]) == row.tokens and sum(units["bytes"]) == row.bytes
    assert sum(units["nll"]) / row.tokens == pytest.approx(row.loss)
    assert sum(p["tokens"] for p in positions) == row.tokens
    assert positions[0]["few_tokens"] and not positions[-1]["few_tokens"]
    assert all(p["documents"] == len(offsets) - 1 for p in positions)
