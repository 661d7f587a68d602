"""Prefix-length ablation (Sun et al. 2021):
the same target tokens, with more and more visible prefix.

For each sample start s (evenly spaced over the test stream) the target block is the T next-token
predictions at inputs tokens[s : s+T]; with prefix P the model reads tokens[s-P : s+T], so target
t has P + (t - s) + 1 tokens of context. Every prefix scores exactly the same targets, so the
loss curve over P isolates what the extra distant context buys.

Each row carries the loss's interval and the gain over prefix 0 (loss with no prefix minus loss
with this one) with its paired interval, documents resampled (stats.py).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from longctx.eval.documents import DocumentSums
from longctx.eval.progress import Progress
from longctx.eval.scoring import Scorer
from longctx.eval.settings import PrefixAblationSettings
from longctx.eval.stats import Bootstrap, ratio_interval


def prefix_lengths(step: int, max_prefix: int) -> list[int]:
    """0, step, 2*step, 4*step, ... below max_prefix, then max_prefix itself."""
    prefixes, prefix = [0], step
    while prefix < max_prefix:
        prefixes.append(prefix)
        prefix *= 2
    if max_prefix > 0:
        prefixes.append(max_prefix)
    return prefixes


def sample_starts(n_tokens: int, max_prefix: int, target_tokens: int, samples: int) -> np.ndarray:
    last = n_tokens - target_tokens - 1  # the last target token must exist
    if last < max_prefix:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.linspace(max_prefix, last, samples).round().astype(np.int64))


def prefix_ablation(
    scorer: Scorer,
    tokens: torch.Tensor,
    settings: PrefixAblationSettings,
    max_length: int,
    batch_size: int,
    offsets: np.ndarray | None = None,
    bootstrap: Bootstrap | None = None,
    progress: Progress | None = None,
) -> list[dict]:
    """One row per prefix length; `offsets` are the test documents' starts (None: one document)."""
    bootstrap = bootstrap or Bootstrap()
    offsets = np.array([0, len(tokens)]) if offsets is None else np.asarray(offsets)
    target = settings.target_tokens
    max_prefix = max(max_length - target, 0)
    starts = sample_starts(len(tokens), max_prefix, target, settings.samples)
    rows, baseline = [], None
    for prefix in prefix_lengths(settings.step, max_prefix):
        row = {
            "prefix_length": prefix,
            "target_tokens": target,
            "samples": len(starts),
            "tokens": 0,
            "documents": 0,
            "loss": None,
            "loss_low": None,
            "loss_high": None,
            "ppl": None,
            "gain": None,
            "gain_low": None,
            "gain_high": None,
            "skipped": None,
        }
        rows.append(row)
        if not len(starts):
            row["skipped"] = (
                f"test stream has {len(tokens)} tokens, "
                f"too few for a prefix of {max_prefix} + {target} targets"
            )
            continue
        row["skipped"] = scorer.refusal(prefix + target)
        if row["skipped"]:
            if progress:
                progress.advance(len(starts))
            continue
        sums = DocumentSums(offsets)
        for first in range(0, len(starts), batch_size):
            chunk = starts[first : first + batch_size]
            windows = torch.stack([tokens[s - prefix : s + target + 1] for s in chunk])
            nll = scorer.nll(windows[:, :-1], windows[:, 1:])[:, prefix:]
            for start, sample_nll in zip(chunk, nll):
                sums.add(np.arange(start + 1, start + target + 1), sample_nll.numpy())
            if progress:
                progress.advance(len(chunk))
        ((row["loss"], row["loss_low"], row["loss_high"]),) = sums.intervals(bootstrap)
        row["tokens"], row["documents"] = int(sums.tokens.sum()), len(sums.scored())
        row["ppl"] = math.exp(min(row["loss"], 700.0))
        if baseline is None and prefix == 0:
            baseline = sums
        if baseline is not None:
            docs = sums.scored()  # the same targets, hence the same documents, for every prefix
            row["gain"], row["gain_low"], row["gain_high"] = ratio_interval(
                (baseline.nll - sums.nll)[docs, 0], sums.tokens[docs, 0], bootstrap
            )
    return rows
