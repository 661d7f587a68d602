"""MQAR accuracy (data=mqar): the share of answers whose value the model predicts, greedily.

An answer counts as correct when the argmax of the logits over the whole vocabulary, at the
query's position, is the value stated with that key (Zoology scores the same way). Rows are
given per (split, sequence length, pairs) setting and, on the test split, per bucket of query
distance (tokens from the key's statement to its query, in power-of-two buckets). The model's
streaming state size at each tested length comes with them (state_size.py): together they place
every run on the recall-versus-state plot of Based (Arora et al. 2024).

Every accuracy carries an interval (`accuracy_low`, `accuracy_high`) from a bootstrap over
examples, not answers: the answers of one example share its keys, filler and context, so they are
not independent draws (stats.py).
"""

from __future__ import annotations

import numpy as np
import torch

from longctx.data.mqar import IGNORE_INDEX, MQARDataModule, MQARSplit, answer_distances
from longctx.eval.scoring import Scorer
from longctx.eval.state_size import streaming_state_size
from longctx.eval.stats import Bootstrap, ratio_intervals

SPLITS = ("validation", "test")


def _bucket(distance: int) -> tuple[int, int]:
    """[2^k, 2^(k+1)) holding `distance` (>= 1)."""
    start = 1 << (int(distance).bit_length() - 1)
    return start, 2 * start


@torch.no_grad()
def _correct_answers(scorer: Scorer, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int):
    """(correct, distance, example) per answer, in row-major order: BoolTensor, LongTensor and
    LongTensor[answers] (`example` is the row each answer belongs to)."""
    correct = []
    for first in range(0, len(inputs), batch_size):
        rows, row_targets = inputs[first : first + batch_size], targets[first : first + batch_size]
        with scorer.autocast_context():
            logits = scorer.model(rows.to(scorer.device))
        answers = row_targets != IGNORE_INDEX
        predicted = logits.argmax(dim=-1).cpu()
        correct.append(predicted[answers] == row_targets[answers])
    example = (targets != IGNORE_INDEX).nonzero()[:, 0]
    return torch.cat(correct), answer_distances(inputs, targets), example


def _accuracy_rows(
    base: dict, columns: list[dict], hits: np.ndarray, counts: np.ndarray, bootstrap: Bootstrap
) -> list[dict]:
    """One row per column of [examples, columns] correct / answer counts, with the accuracy and
    its interval from resampled examples."""
    intervals = ratio_intervals(hits, counts, bootstrap)
    rows = []
    for column, extra in enumerate(columns):
        accuracy, low, high = intervals[column]
        rows.append(
            {
                **base,
                **extra,
                "answers": int(counts[:, column].sum()),
                "correct": int(hits[:, column].sum()),
                "accuracy": accuracy,
                "accuracy_low": low,
                "accuracy_high": high,
            }  # fmt: skip
        )
    return rows


def split_accuracy(
    scorer: Scorer,
    split: MQARSplit,
    split_name: str,
    batch_size: int,
    bootstrap: Bootstrap | None = None,
) -> tuple[list[dict], list[dict]]:
    """(one row per setting, one row per (setting, distance bucket)) of one split."""
    bootstrap = bootstrap or Bootstrap()
    settings_rows, distance_rows = [], []
    for setting, examples in zip(split.settings, split.parts):
        base = {"split": split_name, "seq_len": setting.seq_len, "num_pairs": setting.num_pairs}
        refusal = scorer.refusal(setting.seq_len)
        if refusal:
            settings_rows.append(
                {
                    **base,
                    "examples": len(examples),
                    "answers": 0,
                    "correct": None,
                    "accuracy": None,
                    "accuracy_low": None,
                    "accuracy_high": None,
                    "skipped": refusal,
                }  # fmt: skip
            )
            continue
        correct, distances, example = _correct_answers(
            scorer, examples.inputs, examples.targets, batch_size
        )
        correct, example = correct.numpy().astype(np.float64), example.numpy()
        buckets = sorted({_bucket(d) for d in distances.tolist()})
        column = np.array([buckets.index(_bucket(d)) for d in distances.tolist()], dtype=np.int64)
        shape = (len(examples), len(buckets))
        hits, counts = np.zeros(shape), np.zeros(shape)
        np.add.at(hits, (example, column), correct)
        np.add.at(counts, (example, column), 1.0)
        (row,) = _accuracy_rows(
            base | {"examples": len(examples)},
            [{"skipped": None}],
            hits.sum(1, keepdims=True),
            counts.sum(1, keepdims=True),
            bootstrap,
        )
        settings_rows.append(row)
        distance_rows += _accuracy_rows(
            base,
            [{"distance_start": start, "distance_end": end} for start, end in buckets],
            hits,
            counts,
            bootstrap,
        )
    return settings_rows, distance_rows


def mqar_sections(
    scorer: Scorer, datamodule: MQARDataModule, batch_size: int, bootstrap: Bootstrap | None = None
) -> dict:
    """The results.json sections of an MQAR evaluation: `mqar` (validation and test accuracy per
    setting), `mqar_distance` (test accuracy by query distance) and `state_size` (bytes per
    sequence after each tested length)."""
    sections = {"mqar": [], "mqar_distance": [], "state_size": []}
    for name in SPLITS:
        rows, by_distance = split_accuracy(
            scorer, datamodule.split(name), name, batch_size, bootstrap
        )
        sections["mqar"] += rows
        if name == "test":
            sections["mqar_distance"] = by_distance
    lengths = sorted({s.seq_len for s in datamodule.test_settings})
    sections["state_size"] = [
        streaming_state_size(scorer.model, length, datamodule.vocab_size)
        for length in lengths
        if scorer.refusal(length) is None
    ]
    return sections
