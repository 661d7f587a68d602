"""Passkey retrieval scored by likelihood, over a grid of context length x needle depth.

Prompt (Mohtashami & Jaggi 2023, in tokens): filler text from the test split with the needle
" The pass key is 41273. Remember it. 41273 is the pass key. " inserted at relative depth d
(0 = the start of the context, the farthest from the question; 1 = just before it), then
" What is the pass key? The pass key is". Small models trained from scratch do not follow the
instruction, so the model is not asked to generate: the true key " 41273" and `distractors`
other random keys are scored by log-likelihood, and a trial is correct when the true key is
strictly the most likely. The model reads exactly `length` input tokens per candidate.

Trials draw their keys and filler independently, so a cell's accuracy carries Wilson's interval
over its trials; a cell of two trials says so by its width.
"""

from __future__ import annotations

import random

import numpy as np

from longctx.eval.progress import Progress
from longctx.eval.scoring import Scorer
from longctx.eval.settings import PasskeySettings
from longctx.eval.stats import wilson_interval


def random_keys(rng: random.Random, digits: int, count: int) -> list[int]:
    return rng.sample(range(10 ** (digits - 1), 10**digits), count)


def build_context(
    filler: np.ndarray, needle: list[int], question: list[int], depth: float
) -> list[int]:
    at = round(depth * len(filler))
    return filler[:at].tolist() + needle + filler[at:].tolist() + question


def passkey_grid(
    scorer: Scorer,
    filler: np.ndarray,
    tokenizer,
    settings: PasskeySettings,
    lengths: list[int],
    batch_size: int,
    confidence: float = 0.95,
    progress: Progress | None = None,
) -> tuple[list[dict], list[dict]]:
    """One row per (length, depth), and each scored cell's trial outcomes (units.json).
    `filler` is the test split's tokens with document separators removed."""
    rows, units = [], []
    question = tokenizer.encode(" " + settings.question)
    for length in lengths:
        length_error = scorer.refusal(length)
        for depth in settings.depths:
            row = {
                "context_length": length,
                "depth": depth,
                "trials": 0,
                "correct": 0,
                "accuracy": None,
                "accuracy_low": None,
                "accuracy_high": None,
                "mean_rank": None,
                "skipped": length_error,
            }
            rows.append(row)
            if length_error is None:
                outcomes = _run_cell(
                    scorer, filler, tokenizer, settings, question, length, depth, batch_size, row
                )
                if outcomes:
                    row["accuracy_low"], row["accuracy_high"] = wilson_interval(
                        row["correct"], row["trials"], confidence
                    )
                    units.append({"context_length": length, "depth": depth, "correct": outcomes})
            if progress:
                progress.advance(settings.trials)
    return rows, units


def _run_cell(
    scorer, filler, tokenizer, settings, question, length, depth, batch_size, row
) -> list[int]:
    """Runs the cell's trials into `row`; returns each trial's outcome (1 correct, 0 not)."""
    # Seeded per cell so that adding lengths or depths never changes the keys of the others.
    rng = random.Random(f"{settings.seed}-{length}-{depth}")
    ranks = []
    for _ in range(settings.trials):
        key, *others = random_keys(rng, settings.digits, 1 + settings.distractors)
        needle = tokenizer.encode(" " + settings.needle.format(key=key) + " ")
        candidates = [tokenizer.encode(f" {k}") for k in (key, *others)]
        # The longest candidate decides the filler size: every input is at most `length` tokens.
        filler_length = length + 1 - len(needle) - len(question) - max(len(c) for c in candidates)
        if filler_length < 0:
            row["skipped"] = f"{length} tokens cannot hold the needle, the question and a key"
            return []
        if filler_length > len(filler):
            row["skipped"] = (
                f"the test split has {len(filler)} filler tokens, fewer than {filler_length}"
            )
            return []
        begin = rng.randrange(len(filler) - filler_length + 1)
        context = build_context(filler[begin : begin + filler_length], needle, question, depth)
        scores = scorer.continuation_logprobs(context, candidates, batch_size)
        ranks.append(
            1 + sum(score >= scores[0] for score in scores[1:])
        )  # ties count against the key
    row["trials"] = len(ranks)
    row["correct"] = sum(rank == 1 for rank in ranks)
    row["accuracy"] = row["correct"] / len(ranks)
    row["mean_rank"] = float(np.mean(ranks))
    return [int(rank == 1) for rank in ranks]
