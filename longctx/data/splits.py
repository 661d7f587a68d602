"""Split a pool of documents into train/validation/test by document, never by chunk."""

import hashlib

import numpy as np
from datasets import Dataset, DatasetDict

from longctx.errors import ConfigError

SPLITS = ("train", "validation", "test")


def _document_rank_keys(batch: dict, seed: int) -> dict:
    # 56-bit keys fit Arrow's int64. Keyed on the text itself:
    # reproducible across runs and machines, and exact duplicates share a split.
    return {
        "_rank_key": [
            int.from_bytes(hashlib.sha256(f"{seed}\0{text}".encode()).digest()[:7], "big")
            for text in batch["text"]
        ]
    }


def split_counts(num_docs: int, fractions: dict[str, float]) -> dict[str, int]:
    """Documents per split; every split with a positive fraction gets at least one."""
    if (
        set(fractions) != set(SPLITS)
        or any(f < 0 for f in fractions.values())
        or not np.isclose(sum(fractions.values()), 1.0)
    ):
        raise ConfigError(
            "split_fractions must give non-negative train/validation/test fractions summing to 1, "
            f"got {fractions}"
        )
    wanted = [s for s in SPLITS if fractions[s] > 0]
    if num_docs < len(wanted):
        raise ConfigError(
            f"{num_docs} documents cannot fill the {len(wanted)} splits {wanted} "
            "(splits are by document); give the corpus more documents"
        )
    counts = {
        s: (max(1, round(fractions[s] * num_docs)) if fractions[s] > 0 else 0)
        for s in ("validation", "test")
    }
    counts["train"] = num_docs - counts["validation"] - counts["test"]
    if fractions["train"] > 0 and counts["train"] < 1:
        raise ConfigError(
            f"{num_docs} documents leave none for train with split_fractions {fractions}; "
            "raise data.split_fractions.train or give the corpus more documents"
        )
    return counts


def split_by_document(
    pool: Dataset, fractions: dict[str, float], seed: int, num_proc: int | None
) -> DatasetDict:
    """Seeded shuffle of documents (by a hash of seed and text), then cut by the fractions."""
    keys = pool.map(
        _document_rank_keys,
        batched=True,
        fn_kwargs={"seed": seed},
        remove_columns=pool.column_names,
        num_proc=num_proc,
        desc="ranking documents",
    )["_rank_key"]
    order = np.argsort(np.asarray(keys, dtype=np.int64), kind="stable")
    counts = split_counts(len(pool), fractions)
    bounds = np.cumsum([0] + [counts[s] for s in SPLITS])
    return DatasetDict(
        {s: pool.select(order[bounds[i] : bounds[i + 1]]) for i, s in enumerate(SPLITS)}
    )
