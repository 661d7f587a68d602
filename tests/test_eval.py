"""The context-use metrics against models whose use of context is known exactly.

InductionLM predicts, at each position, the token that followed the latest earlier occurrence of
the last n tokens, looking back at most `reach` positions: it retrieves any needle in reach and
nothing beyond, so passkey and planted-fact results must follow its reach to the cell.
"""

from __future__ import annotations

import random
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import CONF_DIR, model_config
from omegaconf import OmegaConf
from torch.nn import functional as F

from longctx import build_model
from longctx.data.synthetic import FactSettings, generate_synthetic_documents
from longctx.data.tokenizer import ByteTokenizer
from longctx.errors import ConfigError
from longctx.eval.fact_recall import (
    answer_shape,
    distance_bucket,
    distractors_for,
    fact_recall,
    planted_facts,
)
from longctx.eval.passkey import build_context, passkey_grid
from longctx.eval.prefix_ablation import prefix_ablation, prefix_lengths
from longctx.eval.scoring import Scorer
from longctx.eval.settings import (
    EvalSettings,
    FactRecallSettings,
    PasskeySettings,
    PrefixAblationSettings,
    eval_settings,
    settings_dict,
)
from longctx.eval.streaming import streaming_perplexity
from longctx.eval.token_bytes import byte_counter

VOCAB = 257


class InductionLM(torch.nn.Module):
    def __init__(
        self,
        n: int = 6,
        reach: int | None = None,
        max_len: int | None = None,
        vocab_size: int = VOCAB,
    ):
        super().__init__()
        self.n, self.reach, self.max_len, self.vocab_size = n, reach, max_len, vocab_size
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the scorer a device
        self.backend = SimpleNamespace(check_sequence_length=self._check, ordered_stream=False)
        self.dims = SimpleNamespace(context_length=10**9)
        self.pos_embed = None
        self.lengths: list[int] = []

    def _check(self, length: int) -> None:
        if self.max_len is not None and length > self.max_len:
            raise ConfigError(f"at most {self.max_len} positions")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        batch, length = ids.shape
        self.lengths.append(length)
        pos = torch.arange(length)
        match = (
            (pos[:, None] > pos[None, :])
            & (pos[None, :] >= self.n - 1)
            & (pos[:, None] >= self.n - 1)
        )
        if self.reach is not None:
            match &= pos[:, None] - pos[None, :] <= self.reach
        match = match.expand(batch, length, length).clone()
        for k in range(self.n):
            shifted = torch.full_like(ids, -1)
            shifted[:, k:] = ids[:, : length - k]
            match &= shifted[:, :, None] == shifted[:, None, :]
        latest = torch.where(match, pos, -1).max(-1).values
        following = ids.gather(1, (latest + 1).clamp(max=length - 1))
        logits = torch.zeros(batch, length, self.vocab_size)
        logits.scatter_(2, following[..., None], torch.where(latest >= 0, 10.0, 0.0)[..., None])
        return logits


def random_filler(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(32, 127, n)  # printable ASCII, no EOS


PASSKEY = PasskeySettings(depths=[0.0, 0.5, 1.0], trials=3, distractors=3)


def test_passkey_is_found_wherever_it_is_in_reach():
    rows, units = passkey_grid(
        Scorer(InductionLM()),
        random_filler(5000),
        ByteTokenizer(),
        PASSKEY,
        [192, 384],
        batch_size=4,
    )
    assert [(r["context_length"], r["depth"]) for r in rows] == [
        (L, d) for L in (192, 384) for d in (0.0, 0.5, 1.0)
    ]
    assert all(r["accuracy"] == 1.0 and r["mean_rank"] == 1.0 and r["trials"] == 3 for r in rows)
    # Three trials per cell: Wilson's interval says how little 3/3 proves.
    assert all(r["accuracy_high"] == 1.0 and 0.3 < r["accuracy_low"] < 0.5 for r in rows)
    assert [u["correct"] for u in units] == [[1, 1, 1]] * 6


def test_passkey_beyond_reach_is_not_found():
    rows, _ = passkey_grid(
        Scorer(InductionLM(reach=100)), random_filler(5000), ByteTokenizer(), PASSKEY, [512], 4
    )
    accuracy = {r["depth"]: r["accuracy"] for r in rows}
    assert accuracy == {0.0: 0.0, 0.5: 0.0, 1.0: 1.0}


def test_passkey_inputs_are_exactly_the_length_and_the_needle_sits_at_its_depth():
    model = InductionLM()
    passkey_grid(Scorer(model), random_filler(5000), ByteTokenizer(), PASSKEY, [200], batch_size=8)
    assert set(model.lengths) == {200}
    filler, needle, question = np.arange(10), [100, 101], [200]
    assert build_context(filler, needle, question, 0.0)[:2] == needle
    assert build_context(filler, needle, question, 1.0)[-3:] == needle + question
    assert build_context(filler, needle, question, 0.5)[5:7] == needle


def test_passkey_cells_that_cannot_run_say_why():
    rows, units = passkey_grid(
        Scorer(InductionLM(max_len=300)),
        random_filler(5000),
        ByteTokenizer(),
        PASSKEY,
        [50, 400],
        4,
    )
    assert all(r["accuracy"] is None and r["accuracy_low"] is None for r in rows) and not units
    assert "cannot hold" in rows[0]["skipped"] and "at most 300" in rows[-1]["skipped"]


def test_passkey_ties_count_as_failures():
    class Uniform(InductionLM):
        def forward(self, ids):
            return torch.zeros(*ids.shape, VOCAB)

    rows, _ = passkey_grid(
        Scorer(Uniform()), random_filler(5000), ByteTokenizer(), PASSKEY, [192], 4
    )
    assert all(r["accuracy"] == 0.0 and r["mean_rank"] == 1 + PASSKEY.distractors for r in rows)


def synthetic_facts(distances=(64, 256), num_docs=8):
    return planted_facts(
        generate_synthetic_documents(num_docs, distances, seed=3, prefix_chars=100)
    )


def test_planted_facts_are_recalled_only_within_reach():
    facts = synthetic_facts()
    settings = FactRecallSettings(max_docs=8, distractors=3)
    rows, units = fact_recall(
        Scorer(InductionLM(n=12)), facts, ByteTokenizer(), settings, [512], 8, buckets=[64, 256]
    )
    assert {r["distance"]: r["accuracy"] for r in rows} == {64: 1.0, 256: 1.0}
    assert all(r["fact_in_context"] == r["docs"] == 4 for r in rows)
    assert all(r["accuracy_high"] == 1.0 and r["accuracy_low"] < 0.6 for r in rows)  # 4/4
    (unit,) = units
    assert unit["documents"] == list(range(8)) and unit["correct"] == [1] * 8
    limited, _ = fact_recall(
        Scorer(InductionLM(n=12, reach=200)), facts, ByteTokenizer(), settings, [512], 8, [64, 256]
    )
    assert {r["distance"]: r["accuracy"] for r in limited} == {64: 1.0, 256: 0.0}
    short, _ = fact_recall(
        Scorer(InductionLM(n=12)), facts, ByteTokenizer(), settings, [200], 8, [64, 256]
    )
    assert {r["distance"]: (r["accuracy"], r["fact_in_context"]) for r in short} == {
        64: (1.0, 4),
        256: (0.0, 0),
    }


def test_planted_facts_are_one_per_answer_with_their_own_distance():
    docs = list(
        generate_synthetic_documents(
            4, (64, 256), seed=5, prefix_chars=50, settings=FactSettings(facts=3, code_length=6)
        )
    )
    facts = planted_facts(docs)
    assert len(facts) == 12
    for doc, group in zip(docs, [facts[i : i + 3] for i in range(0, 12, 3)]):
        for fact, (fact_start, _), (answer_start, answer_end) in zip(
            group, doc["fact_char_spans"], doc["answer_char_spans"]
        ):
            assert (
                fact.context == doc["text"][:answer_start]
                and fact.answer == doc["text"][answer_start:answer_end]
            )
            assert (
                fact.distance == answer_start - fact_start >= doc["distance"]
                and fact.fact_start == fact_start
            )
    rows, (unit,) = fact_recall(
        Scorer(InductionLM(n=12)),
        facts,
        ByteTokenizer(),
        FactRecallSettings(max_docs=12, distractors=3),
        [1024],
        8,
        buckets=[64, 256],
    )
    # One fact per document: scored facts are independent trials.
    assert sum(r["docs"] for r in rows) == 4 and all(r["accuracy"] == 1.0 for r in rows)
    assert unit["documents"] == [0, 1, 2, 3]


def test_fact_distractors_start_with_the_other_codes_of_the_document():
    fact = synthetic_facts(distances=(256,), num_docs=1)[0]
    in_document = set(answer_shape(fact.answer).findall(fact.context)) - {fact.answer}
    assert in_document  # the generator states other codes between fact and question
    chosen = distractors_for(fact, ["0000", "1111", fact.answer], 50, random.Random(0))
    assert set(chosen[: len(in_document)]) == in_document and fact.answer not in chosen
    assert {"0000", "1111"} <= set(chosen)


def test_distance_buckets():
    assert [distance_bucket(d, [64, 256, 1024]) for d in (70, 255, 256, 5000, 10)] == [
        64,
        64,
        256,
        1024,
        64,
    ]
    assert distance_bucket(300, None) == 256 and distance_bucket(None, [64]) is None


@pytest.fixture(scope="module")
def full_model():
    torch.manual_seed(0)
    return build_model(model_config("full"), VOCAB).eval()


def test_prefix_ablation_scores_fixed_targets_with_exactly_the_visible_prefix(full_model):
    tokens = torch.randint(0, 256, (600,), generator=torch.Generator().manual_seed(5))
    settings = PrefixAblationSettings(target_tokens=8, step=16, samples=3)
    rows = prefix_ablation(Scorer(full_model), tokens, settings, max_length=40, batch_size=2)
    assert [r["prefix_length"] for r in rows] == [0, 16, 32]
    assert all(r["tokens"] == 24 and r["skipped"] is None for r in rows)
    starts = np.unique(np.linspace(32, 600 - 9, 3).round().astype(int))
    with torch.no_grad():
        expected = np.mean(
            [
                F.cross_entropy(
                    full_model(tokens[None, s - 32 : s + 8])[0, 32:],
                    tokens[s + 1 : s + 9],
                    reduction="none",
                ).numpy()
                for s in starts
            ]
        )
    assert rows[2]["loss"] == pytest.approx(expected, rel=1e-6)
    # Tokens before the visible prefix never matter; tokens inside it do.
    hidden, visible = tokens.clone(), tokens.clone()
    hidden[: starts[0] - 32] = (
        hidden[: starts[0] - 32] + 7
    ) % 256  # before every sample's 32-token prefix
    visible[starts[0] - 10] = (
        visible[starts[0] - 10] + 1
    ) % 256  # inside the first sample's prefix
    again = prefix_ablation(Scorer(full_model), hidden, settings, 40, 2)
    changed = prefix_ablation(Scorer(full_model), visible, settings, 40, 2)
    assert again[2]["loss"] == rows[2]["loss"]
    assert changed[2]["loss"] != rows[2]["loss"]


def test_prefix_lengths_double_up_to_the_maximum():
    assert prefix_lengths(256, 1920) == [0, 256, 512, 1024, 1920]
    assert prefix_lengths(256, 1024) == [0, 256, 512, 1024]
    assert prefix_lengths(256, 0) == [0]


def test_streaming_carries_state_across_segments_and_resets_at_documents(full_model):
    tokens = np.random.default_rng(6).integers(0, 256, 100)
    count = byte_counter(ByteTokenizer())
    scorer = Scorer(full_model)
    carried, by_position, _ = streaming_perplexity(
        scorer, tokens, np.array([0, 100]), 8, 1, 24, count
    )
    with torch.no_grad():
        ids = torch.from_numpy(tokens)
        whole = F.cross_entropy(full_model(ids[None, :24])[0], ids[1:25]).item()
        split = np.mean(
            [
                F.cross_entropy(
                    full_model(ids[None, b : b + 8])[0], ids[b + 1 : b + 9], reduction="none"
                ).numpy()
                for b in (0, 8, 16)
            ]
        )
    assert carried.protocol == "streaming" and carried.tokens == 24
    assert carried.loss == pytest.approx(whole, rel=1e-5)
    reset, _, units = streaming_perplexity(
        scorer, tokens, np.array([0, 8, 16, 100]), 8, 1, 24, count
    )
    assert reset.loss == pytest.approx(split, rel=1e-5)
    # Targets 1-8, 9-16 and 17-24 belong to documents 0, 1 (from 8) and 2 (from 16): 7, 8, 9.
    assert units["documents"] == [0, 1, 2] and units["tokens"] == [7, 8, 9]
    assert reset.documents == 3 and reset.loss_low < reset.loss < reset.loss_high
    assert carried.loss != pytest.approx(reset.loss, rel=1e-3)
    # the fresh-state column is the reset stream's loss; both columns cover every scored token
    assert [(r["position_start"], r["position_end"]) for r in by_position] == [
        (0, 1),
        (1, 2),
        (2, 4),
        (4, 8),
    ]
    assert sum(r["tokens"] for r in by_position) == 24

    def mean(column):
        return sum(r[column] * r["tokens"] for r in by_position) / 24

    assert mean("loss_with_state") == pytest.approx(whole, rel=1e-5)
    assert mean("loss_fresh_state") == pytest.approx(split, rel=1e-5)


def test_streaming_is_skipped_when_the_model_cannot_reach_that_far():
    row, by_position, units = streaming_perplexity(
        Scorer(InductionLM(max_len=16)),
        np.zeros(100, dtype=np.int64),
        np.array([0, 100]),
        8,
        1,
        48,
        byte_counter(ByteTokenizer()),
    )
    assert row.loss is None and "at most 16" in row.skipped and by_position == [] and units is None


def test_eval_yaml_lists_every_setting_with_its_default():
    section = OmegaConf.load(f"{CONF_DIR}/eval.yaml").eval
    assert eval_settings(section) == EvalSettings()
    assert OmegaConf.to_container(section) == settings_dict(EvalSettings())


@pytest.mark.parametrize(
    "section,message",
    [
        ({"context_length": [64]}, "no setting(s) ['context_length']"),
        ({"strides": [1.5]}, "eval.strides entry 1.5"),
        ({"passkey": {"depths": [2.0]}}, "must lie in [0, 1]"),
        ({"passkey": {"needle": "no key here"}}, "must contain {key}"),
        ({"streaming": {"enabled": "yes"}}, "eval.streaming.enabled"),
        ({"autocast": "fp16"}, "eval.autocast"),
        ({"window_placement": "random"}, "eval.window_placement='random'"),
        ({"bootstrap": {"confidence": 95}}, "eval.bootstrap.confidence=95"),
        ({"max_tokens": 0}, "eval.max_tokens"),
    ],
)
def test_bad_eval_settings_say_what_to_change(section, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        eval_settings(section)


def test_continuation_scores_are_log_likelihoods():
    model = InductionLM()
    scorer = Scorer(model)
    context = list(range(40, 60)) * 2
    true, other = [40, 41, 42], [41, 40, 42]
    scores = scorer.continuation_logprobs(context, [true, other, [40]], batch_size=2)
    assert scores[0] == pytest.approx(
        3 * (10 - np.log(np.exp(10) + VOCAB - 1)), abs=1e-4
    )  # float32 log-softmax
    assert scores[1] < scores[0] and scores[2] == pytest.approx(scores[0] / 3, abs=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_evaluation_matches_the_cpu_and_records_peak_memory(full_model):
    from longctx.eval.perplexity import score_windows

    tokens = torch.randint(0, 256, (400,), generator=torch.Generator().manual_seed(7))
    count = byte_counter(ByteTokenizer())
    cpu_row = score_windows(Scorer(full_model), tokens, 32, 16, 10**6, 4, count).row
    cuda_model = build_model(model_config("full"), VOCAB).eval()
    cuda_model.load_state_dict(full_model.state_dict())
    cuda_row = score_windows(Scorer(cuda_model.cuda()), tokens, 32, 16, 10**6, 4, count).row
    bf16_row = score_windows(
        Scorer(cuda_model, autocast="bf16"), tokens, 32, 16, 10**6, 4, count
    ).row
    assert cuda_row.loss == pytest.approx(cpu_row.loss, rel=1e-4)
    assert bf16_row.loss == pytest.approx(
        cpu_row.loss, rel=2e-2
    )  # bf16 logits: ~3 significant digits
    assert cuda_row.peak_memory_mib > 0 and cpu_row.peak_memory_mib is None
