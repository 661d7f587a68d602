"""LongDocDataModule: corpus -> tokenizer -> cached token streams -> packed or ordered batches."""

from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

import lightning as L
import numpy as np
import torch
from datasets import DatasetDict
from torch.utils.data import DataLoader

from longctx.data.config import to_plain_dict
from longctx.data.corpus import corpus_fingerprint, load_corpus
from longctx.data.packing import OrderedStream, PackedWindows
from longctx.data.splits import SPLITS
from longctx.data.token_cache import TokenSplit, build_token_cache, load_token_split, token_cache_path
from longctx.data.tokenizer import Tokenizer, build_tokenizer

SAMPLING_MODES = ("packed", "ordered")
_BINCOUNT_CHUNK = 1 << 24


class LongDocDataModule(L.LightningDataModule):
    """Batches are dicts {"input_ids", "targets": LongTensor[B, N]} plus "reset": BoolTensor[B] when ordered.

    sampling="packed": training windows are shuffled (DistributedSampler under DDP);
    validation/test windows tile the split in order, optionally thinned to
    `data.max_eval_windows` evenly spaced windows.
    sampling="ordered": every split is an OrderedStream (see packing.py); the
    evaluation cap becomes max_eval_windows // batch_size batches.
    """

    def __init__(self, data_cfg, tokenizer_cfg, context_length: int, batch_size: int, num_workers: int = 0,
                 sampling: str = "packed", seed: int = 0):
        super().__init__()
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"sampling must be one of {SAMPLING_MODES}, got {sampling!r}")
        self.data_cfg = to_plain_dict(data_cfg)
        self.tokenizer_cfg = to_plain_dict(tokenizer_cfg)
        self.context_length = int(context_length)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.sampling = sampling
        self.seed = int(seed)
        self.cache_dir = Path(self.data_cfg["cache_dir"])
        self.corpus_fingerprint = corpus_fingerprint(self.data_cfg)
        self._corpus: DatasetDict | None = None
        self._splits: dict[str, TokenSplit] = {}

    # --- building (prepare_data runs once per node, setup on every rank) ---

    def _load_corpus(self) -> DatasetDict:
        if self._corpus is None:
            self._corpus = load_corpus(self.data_cfg)
        return self._corpus

    def _train_texts(self) -> Iterator[str]:
        for batch in self._load_corpus()["train"].iter(batch_size=256):
            yield from batch["text"]

    @cached_property
    def tokenizer(self) -> Tokenizer:
        # Lazy so a cached bpe tokenizer (or byte) never loads the corpus.
        return build_tokenizer(self.tokenizer_cfg, self._train_texts, self.cache_dir, self.corpus_fingerprint)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def token_cache(self) -> Path:
        return token_cache_path(self.cache_dir, self.corpus_fingerprint, self.tokenizer)

    def prepare_data(self) -> None:
        if not self.token_cache.is_dir():
            build_token_cache(self._load_corpus(), self.tokenizer, self.token_cache, self.data_cfg.get("num_proc"))

    def setup(self, stage: str | None = None) -> None:
        if not self.token_cache.is_dir():  # setup called without prepare_data, e.g. from eval
            self.prepare_data()
        self._splits = {split: load_token_split(self.token_cache, split) for split in SPLITS}

    # --- loaders ---

    def train_dataloader(self) -> DataLoader:
        if self.sampling == "ordered":
            return self._ordered_loader("train", max_batches=None)
        return DataLoader(
            PackedWindows(self.split_tokens("train"), self.context_length), batch_size=self.batch_size, shuffle=True,
            drop_last=True, generator=torch.Generator().manual_seed(self.seed), num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def _eval_loader(self, split: str) -> DataLoader:
        max_windows = self.data_cfg.get("max_eval_windows")
        if self.sampling == "ordered":
            return self._ordered_loader(split, max_batches=max(1, max_windows // self.batch_size) if max_windows else None)
        windows = PackedWindows(self.split_tokens(split), self.context_length, max_windows=max_windows)
        return DataLoader(windows, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)

    def _ordered_loader(self, split: str, max_batches: int | None) -> DataLoader:
        stream = OrderedStream(self.split_tokens(split), self._split(split).doc_offsets, self.context_length, self.batch_size, max_batches=max_batches)
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers)

    # --- what evaluation and the train loop read ---

    def _split(self, split: str) -> TokenSplit:
        if not self._splits:
            self.setup()
        return self._splits[split]

    def split_tokens(self, split: str) -> np.ndarray:
        """The split's flat token stream: each document followed by EOS (read-only memory map)."""
        return self._split(split).tokens

    def split_documents(self, split: str) -> list[np.ndarray]:
        """Per-document token arrays, without the EOS separators."""
        token_split = self._split(split)
        offsets = token_split.doc_offsets
        return [token_split.tokens[offsets[i]: offsets[i + 1] - 1] for i in range(token_split.num_docs)]

    def split_utf8_bytes(self, split: str) -> int:
        """UTF-8 bytes of the split's document texts (EOS separators excluded), for bits per byte."""
        return self._split(split).utf8_bytes

    def unigram_entropy(self, split: str = "train") -> float:
        """Entropy in nats/token of the split's unigram distribution: the loss of a context-free model."""
        tokens = self.split_tokens(split)
        counts = np.zeros(self.vocab_size, dtype=np.int64)
        for begin in range(0, len(tokens), _BINCOUNT_CHUNK):  # chunked: bincount upcasts to int64
            counts += np.bincount(tokens[begin: begin + _BINCOUNT_CHUNK], minlength=self.vocab_size)
        probs = counts[counts > 0] / counts.sum()
        return float(-(probs * np.log(probs)).sum())
