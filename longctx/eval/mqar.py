"""MQAR accuracy (data=mqar): the share of answers whose value the model predicts, greedily.

An answer counts as correct when the argmax of the logits over the whole vocabulary, at the
query's position, is the value stated with that key (Zoology scores the same way). Rows are
given per (split, sequence length, pairs) setting and, on the test split, per bucket of query
distance (tokens from the key's statement to its query, in power-of-two buckets). The model's
streaming state size at each tested length comes with them (state_size.py): together they place
every run on the recall-versus-state plot of Based (Arora et al. 2024).
"""

from __future__ import annotations

from collections import defaultdict

import torch

from longctx.data.mqar import IGNORE_INDEX, MQARDataModule, MQARSplit, answer_distances
from longctx.eval.scoring import Scorer
from longctx.eval.state_size import streaming_state_size

SPLITS = ("validation", "test")


def _bucket(distance: int) -> tuple[int, int]:
    """[2^k, 2^(k+1)) holding `distance` (>= 1)."""
    start = 1 << (int(distance).bit_length() - 1)
    return start, 2 * start


@torch.no_grad()
def _correct_answers(scorer: Scorer, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int):
    """(correct, distance) per answer: BoolTensor and LongTensor[answers], in row-major order."""
    correct = []
    for first in range(0, len(inputs), batch_size):
        rows, row_targets = inputs[first : first + batch_size], targets[first : first + batch_size]
        with scorer.autocast_context():
            logits = scorer.model(rows.to(scorer.device))
        answers = row_targets != IGNORE_INDEX
        predicted = logits.argmax(dim=-1).cpu()
        correct.append(predicted[answers] == row_targets[answers])
    return torch.cat(correct), answer_distances(inputs, targets)


def split_accuracy(
    scorer: Scorer, split: MQARSplit, split_name: str, batch_size: int
) -> tuple[list[dict], list[dict]]:
    """(one row per setting, one row per (setting, distance bucket)) of one split."""
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
                    "skipped": refusal,
                }  # fmt: skip
            )
            continue
        correct, distances = _correct_answers(scorer, examples.inputs, examples.targets, batch_size)
        settings_rows.append(
            {
                **base,
                "examples": len(examples),
                "answers": len(correct),
                "correct": int(correct.sum()),
                "accuracy": float(correct.float().mean()),
                "skipped": None,
            }  # fmt: skip
        )
        buckets = defaultdict(list)
        for hit, distance in zip(correct.tolist(), distances.tolist()):
            buckets[_bucket(distance)].append(hit)
        for (start, end), hits in sorted(buckets.items()):
            distance_rows.append(
                {
                    **base,
                    "distance_start": start,
                    "distance_end": end,
                    "answers": len(hits),
                    "correct": sum(hits),
                    "accuracy": sum(hits) / len(hits),
                }  # fmt: skip
            )
    return settings_rows, distance_rows


def mqar_sections(scorer: Scorer, datamodule: MQARDataModule, batch_size: int) -> dict:
    """The results.json sections of an MQAR evaluation: `mqar` (validation and test accuracy per
    setting), `mqar_distance` (test accuracy by query distance) and `state_size` (bytes per
    sequence after each tested length)."""
    sections = {"mqar": [], "mqar_distance": [], "state_size": []}
    for name in SPLITS:
        rows, by_distance = split_accuracy(scorer, datamodule.split(name), name, batch_size)
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
