"""Which test document each scored token belongs to, and the per-document sums behind intervals.

The test split is one stream: each document's tokens, then EOS. Document d owns stream
positions [offsets[d], offsets[d + 1]), its EOS included; a scored target at stream position t
belongs to the document that owns t. Windows may cross document boundaries: each scored token
still counts for its own document, so a document's sums are exact whatever the windows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from longctx.eval.stats import Bootstrap, ratio_intervals
from longctx.eval.token_bytes import ByteCounter


def document_of(offsets: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Index of the document owning each stream position."""
    return np.searchsorted(np.asarray(offsets[:-1]), positions, side="right") - 1


@dataclass
class DocumentSums:
    """Summed NLL and token counts per (document, column), UTF-8 bytes per document.

    Columns are position bins for loss by position, or a single column for a whole figure.
    """

    offsets: np.ndarray
    columns: int = 1
    nll: np.ndarray = field(init=False)
    tokens: np.ndarray = field(init=False)
    bytes: np.ndarray = field(init=False)

    def __post_init__(self):
        documents = len(self.offsets) - 1
        self.nll = np.zeros((documents, self.columns))
        self.tokens = np.zeros((documents, self.columns), dtype=np.int64)
        self.bytes = np.zeros(documents, dtype=np.int64)

    def add(
        self,
        positions: np.ndarray,
        nll: np.ndarray,
        columns: np.ndarray | None = None,
        targets=None,
        count_bytes: ByteCounter | None = None,
    ) -> None:
        """Scored targets at stream `positions` (ascending) with their NLL; bytes when given the
        target ids and a counter (counted per run of one document: exact for any tokenizer)."""
        documents = document_of(self.offsets, positions)
        column = np.zeros(len(positions), dtype=np.int64) if columns is None else columns
        np.add.at(self.nll, (documents, column), nll)
        np.add.at(self.tokens, (documents, column), 1)
        if count_bytes is None:
            return
        cuts = np.flatnonzero(np.diff(documents)) + 1
        for begin, end in zip(np.r_[0, cuts], np.r_[cuts, len(documents)]):
            self.bytes[documents[begin]] += count_bytes(targets[begin:end])

    def scored(self) -> np.ndarray:
        """Indices of the documents with at least one scored token."""
        return np.flatnonzero(self.tokens.sum(1) > 0)

    def intervals(self, settings: Bootstrap) -> list[tuple]:
        """(loss, low, high) per column, documents as the resampled units."""
        docs = self.scored()
        return ratio_intervals(self.nll[docs], self.tokens[docs], settings)

    def total_interval(self, settings: Bootstrap) -> tuple:
        """(loss, low, high) over all columns together."""
        docs = self.scored()
        (result,) = ratio_intervals(
            self.nll[docs].sum(1, keepdims=True), self.tokens[docs].sum(1, keepdims=True), settings
        )
        return result

    def bits_per_byte(self, settings: Bootstrap) -> tuple:
        """(bpb, low, high): summed NLL in bits over UTF-8 bytes, resampled by document."""
        docs = self.scored()
        (result,) = ratio_intervals(
            self.nll[docs].sum(1, keepdims=True) / np.log(2),
            self.bytes[docs, None],
            settings,
        )
        return result

    def units(self) -> dict:
        """What a paired comparison needs: per scored document, its id, NLL, tokens and bytes."""
        docs = self.scored()
        return {
            "documents": docs.tolist(),
            "nll": self.nll[docs].sum(1).tolist(),
            "tokens": self.tokens[docs].sum(1).tolist(),
            "bytes": self.bytes[docs].tolist(),
        }
