"""Recall of planted facts, for corpora whose documents carry `answer_char_spans` (data=synthetic).

A synthetic document states facts such as "The code of Kalomi is 4821." and, at least
`distance` characters later, asks "... Answer: the code of Kalomi is " followed by the code.
The text before each answer is the context, left-truncated so that the model reads at most
`length` tokens; the true answer is ranked by likelihood against distractors of the same shape:
first the other codes stated in the same document (copying the wrong fact is a failure, not
luck), then answers of other documents. Rows are grouped by planted distance (a fact's distance
is at least its bucket: the corpus's configured distances, or powers of two), with how many
facts still lay inside the truncated context, so a mechanism's reach reads off directly.

Scored facts come from distinct documents (one drawn per sampled document), so they are
independent trials: accuracy carries Wilson's interval, the answer NLL a bootstrap interval
over facts (stats.py).
"""

from __future__ import annotations

import math
import random
import re
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from longctx.eval.progress import Progress
from longctx.eval.scoring import Scorer
from longctx.eval.settings import FactRecallSettings
from longctx.eval.stats import Bootstrap, ratio_interval, wilson_interval


@dataclass(frozen=True)
class PlantedFact:
    context: str  # the document's text before the answer
    answer: str
    distance: (
        int | None
    )  # characters from the fact to the answer (None when the corpus has no such column)
    fact_start: int | None  # character offset of the fact's answer text in `context`
    document: int = 0  # index of its document in the test split


def planted_facts(documents) -> list[PlantedFact]:
    """One fact per answer span of each document row (rows are dicts or a datasets.Dataset).

    A row's `fact_char_spans[i]` is where answer i was stated; its distance is from the start of
    the one to the start of the other (the reach a copy of each digit needs), or the row's
    `distance` column when the corpus records no fact spans.
    """
    facts = []
    for index, row in enumerate(documents):
        fact_spans = row.get("fact_char_spans") or []
        for i, (start, end) in enumerate(row.get("answer_char_spans") or []):
            fact_start = fact_spans[i][0] if i < len(fact_spans) else None
            distance = start - fact_start if fact_start is not None else row.get("distance")
            facts.append(
                PlantedFact(
                    row["text"][:start], row["text"][start:end], distance, fact_start, index
                )
            )
    return facts


def answer_shape(answer: str) -> re.Pattern:
    """Strings that look like `answer`:
    same length, digits where it has digits, letters where letters."""
    pieces = ["\\d" if c.isdigit() else "[A-Za-z]" if c.isalpha() else re.escape(c) for c in answer]
    return re.compile(r"(?<![\w])" + "".join(pieces) + r"(?![\w])")


def distractors_for(
    fact: PlantedFact, pool: list[str], count: int, rng: random.Random
) -> list[str]:
    in_document = [
        s
        for s in dict.fromkeys(reversed(answer_shape(fact.answer).findall(fact.context)))
        if s != fact.answer
    ]
    others = [a for a in dict.fromkeys(pool) if a != fact.answer and a not in in_document]
    rng.shuffle(others)
    return (in_document + others)[:count]


def distance_bucket(distance: int | None, buckets: list[int] | None) -> int | None:
    """The largest bucket not above `distance` (the smallest bucket if all are);
    powers of two without buckets."""
    if distance is None:
        return None
    if not buckets:
        return 2 ** int(math.log2(max(distance, 1)))
    return max([b for b in buckets if b <= distance] or [min(buckets)])


def choose_facts(facts: list[PlantedFact], max_docs: int, seed: int) -> list[PlantedFact]:
    """One fact from each of `max_docs` documents drawn at random (seeded), in document order."""
    by_document = defaultdict(list)
    for fact in facts:
        by_document[fact.document].append(fact)
    rng = random.Random(seed)
    documents = sorted(rng.sample(sorted(by_document), min(max_docs, len(by_document))))
    return [rng.choice(by_document[d]) for d in documents]


def fact_recall(
    scorer: Scorer,
    facts: list[PlantedFact],
    tokenizer,
    settings: FactRecallSettings,
    lengths: list[int],
    batch_size: int,
    buckets: list[int] | None = None,
    bootstrap: Bootstrap | None = None,
    progress: Progress | None = None,
) -> tuple[list[dict], list[dict]]:
    """Rows per (length, distance bucket), and each length's per-fact outcomes (units.json)."""
    bootstrap = bootstrap or Bootstrap()
    chosen = choose_facts(facts, settings.max_docs, settings.seed)
    pool = [f.answer for f in facts]
    rows, units = [], []
    for length in lengths:
        refusal = scorer.refusal(length)
        if refusal:
            rows.append(_row(length, None, skipped=refusal))
            if progress:
                progress.advance(len(chosen))
            continue
        groups, scored = defaultdict(list), []
        for fact in chosen:
            distractors = distractors_for(
                fact, pool, settings.distractors, random.Random(f"{settings.seed}-{fact.document}")
            )
            result = _score(scorer, tokenizer, fact, distractors, length, batch_size)
            groups[distance_bucket(fact.distance, buckets)].append(result)
            scored.append(result)
            if progress:
                progress.advance()
        for distance in sorted(groups, key=lambda d: (d is None, d)):
            rows.append(_summarise(length, distance, groups[distance], bootstrap))
        units.append(
            {
                "context_length": length,
                "documents": [f.document for f in chosen],
                "in_context": [int(r["in_context"]) for r in scored],
                "correct": [int(r["correct"]) for r in scored],
                "answer_nll": [r["answer_nll"] for r in scored],
            }
        )
    return rows, units


def _score(
    scorer, tokenizer, fact: PlantedFact, distractors: list[str], length: int, batch_size: int
) -> dict:
    candidates = [tokenizer.encode(a) for a in (fact.answer, *distractors)]
    context = tokenizer.encode(fact.context)
    # Every input (context + candidate - 1) holds at most `length` tokens.
    visible = context[-max(length + 1 - max(len(c) for c in candidates), 1) :]
    in_context = fact.fact_start is not None and len(
        tokenizer.encode(fact.context[fact.fact_start :])
    ) <= len(visible)
    scores = scorer.continuation_logprobs(visible, candidates, batch_size)
    return {
        "correct": all(scores[0] > s for s in scores[1:]),
        "answer_nll": -scores[0] / len(candidates[0]),
        "in_context": in_context,
    }


def _row(length: int, distance, docs: int = 0, skipped: str | None = None) -> dict:
    return {
        "context_length": length,
        "distance": distance,
        "docs": docs,
        "fact_in_context": 0,
        "correct": 0,
        "accuracy": None,
        "accuracy_low": None,
        "accuracy_high": None,
        "answer_nll": None,
        "answer_nll_low": None,
        "answer_nll_high": None,
        "skipped": skipped,
    }


def _summarise(length: int, distance, results: list[dict], bootstrap: Bootstrap) -> dict:
    row = _row(length, distance, docs=len(results))
    row["fact_in_context"] = sum(r["in_context"] for r in results)
    row["correct"] = sum(r["correct"] for r in results)
    row["accuracy"] = row["correct"] / len(results)
    row["accuracy_low"], row["accuracy_high"] = wilson_interval(
        row["correct"], len(results), bootstrap.confidence
    )
    nll = np.array([r["answer_nll"] for r in results])
    row["answer_nll"], row["answer_nll_low"], row["answer_nll_high"] = ratio_interval(
        nll, np.ones_like(nll), bootstrap
    )
    return row
