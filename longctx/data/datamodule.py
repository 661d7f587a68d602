"""LongDocDataModule: corpus -> tokenizer -> cached token streams -> packed or ordered batches."""

from collections.abc import Iterator, Mapping
from functools import cached_property
from pathlib import Path

import lightning as L
import numpy as np
import torch
from datasets import DatasetDict
from torch.utils.data import DataLoader

from longctx.data.config import to_plain_dict
from longctx.data.corpus import corpus_fingerprint, load_corpus
from longctx.data.locks import exclusive_lock
from longctx.data.mqar import MQARDataModule
from longctx.data.packing import (
    OrderedStream,
    PackedWindows,
    ResumableShardSampler,
    distributed_rank_and_world,
)
from longctx.data.splits import SPLITS
from longctx.data.token_cache import (
    TokenSplit,
    build_token_cache,
    load_token_split,
    token_cache_path,
)
from longctx.data.tokenizer import Tokenizer, build_tokenizer

SAMPLING_MODES = ("packed", "ordered")
_BINCOUNT_CHUNK = 1 << 24


class ResumableDataLoader(DataLoader):
    """The training DataLoader, whose position in the epoch Lightning saves with each checkpoint.

    Lightning saves `state_dict()` of stateful training loaders in the checkpoint's loops state
    and calls `load_state_dict()` before a resumed fit iterates. The state is how many batches
    of the current epoch were handed out. Lightning does not prefetch from a loader of known
    length, so that is the number trained on. The next iteration starts at the batch after
    them, without reading the skipped ones: through ResumableShardSampler.start_index for
    packed windows, OrderedStream.start_batch for ordered streams. Which epoch it is comes from
    the sampler's epoch, which Lightning restores with set_epoch before iterating.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._batches_yielded = 0
        self._resume_at = 0

    def state_dict(self) -> dict:
        return {"batches_yielded": self._batches_yielded}

    def load_state_dict(self, state: dict) -> None:
        self._resume_at = int(state["batches_yielded"])

    def __iter__(self):
        # A generator: its body runs at the first next(), after Lightning's set_epoch.
        # A checkpoint taken after an epoch's last batch resumes with the next epoch's first.
        start = self._resume_at if self._resume_at < len(self) else 0
        self._resume_at = 0
        if isinstance(self.dataset, OrderedStream):
            self.dataset.start_batch = start
        else:
            self.sampler.start_index = start * self.batch_size
        self._batches_yielded = start
        for batch in super().__iter__():
            self._batches_yielded += 1
            yield batch


class LongDocDataModule(L.LightningDataModule):
    """Batches are dicts {"input_ids", "targets": LongTensor[B, N]}
    plus "reset": BoolTensor[B] when ordered.

    sampling="packed": training windows are shuffled, each DDP rank drawing its own share
    (ResumableShardSampler); validation/test windows tile the split in order, optionally
    thinned to `data.max_eval_windows` evenly spaced windows.
    sampling="ordered": every split is an OrderedStream (see packing.py); the
    evaluation cap becomes max_eval_windows // batch_size batches.
    The training loader is a ResumableDataLoader, so resuming continues where the data stopped.
    Every loader draws its worker seeds from its own generator, not the global RNG, so that
    running validation or not (a resumed run skips the one due at its checkpoint) leaves the
    training randomness unchanged.
    """

    def __init__(
        self,
        data_cfg,
        tokenizer_cfg,
        context_length: int,
        batch_size: int,
        num_workers: int = 0,
        sampling: str = "packed",
        seed: int = 0,
        tokenizer: Tokenizer | None = None,
    ):
        """`tokenizer`: a tokenizer to use as it is (a checkpoint's own) instead of building the
        one `tokenizer_cfg` names."""
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
        if tokenizer is not None:
            self.__dict__["tokenizer"] = tokenizer  # fills the cached property below

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
        return build_tokenizer(
            self.tokenizer_cfg, self._train_texts, self.cache_dir, self.corpus_fingerprint
        )

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def token_cache(self) -> Path:
        return token_cache_path(self.cache_dir, self.corpus_fingerprint, self.tokenizer)

    def prepare_data(self) -> None:
        """Download, train the tokenizer and tokenise, once for all processes that share the cache.

        Every rank calls this (under srun or torchrun all start at once): the first one to take
        the cache's lock prepares, the others wait for it and then find the caches ready.
        """
        with exclusive_lock(self.cache_dir / "locks" / f"{self.corpus_fingerprint}.lock"):
            if not self.token_cache.is_dir():
                build_token_cache(
                    self._load_corpus(),
                    self.tokenizer,
                    self.token_cache,
                    self.data_cfg.get("num_proc"),
                )

    def setup(self, stage: str | None = None) -> None:
        if not self.token_cache.is_dir():  # setup called without prepare_data, e.g. from eval
            self.prepare_data()
        self._splits = {split: load_token_split(self.token_cache, split) for split in SPLITS}

    # --- loaders ---

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)

    def train_dataloader(self) -> DataLoader:
        # Read here, not in setup(): under DDP the process group exists once fit has started.
        rank, world_size = distributed_rank_and_world()
        if self.sampling == "ordered":
            stream = self._ordered_stream(
                "train", max_batches=None, rank=rank, world_size=world_size
            )
            # No persistent workers: each iteration must hand the workers the current start_batch.
            return ResumableDataLoader(
                stream, batch_size=None, num_workers=self.num_workers, generator=self._generator()
            )
        windows = PackedWindows(self.split_tokens("train"), self.context_length)
        return ResumableDataLoader(
            windows,
            batch_size=self.batch_size,
            sampler=ResumableShardSampler(windows, world_size, rank, self.seed),
            drop_last=True,
            generator=self._generator(),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def _eval_loader(self, split: str) -> DataLoader:
        max_windows = self.data_cfg.get("max_eval_windows")
        if self.sampling == "ordered":
            rank, world_size = distributed_rank_and_world()
            max_batches = max(1, max_windows // self.batch_size) if max_windows else None
            stream = self._ordered_stream(split, max_batches, rank, world_size)
            return DataLoader(
                stream, batch_size=None, num_workers=self.num_workers, generator=self._generator()
            )
        windows = PackedWindows(
            self.split_tokens(split), self.context_length, max_windows=max_windows
        )
        return DataLoader(
            windows,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            generator=self._generator(),
        )

    def _ordered_stream(
        self, split: str, max_batches: int | None, rank: int, world_size: int
    ) -> OrderedStream:
        return OrderedStream(
            self.split_tokens(split),
            self._split(split).doc_offsets,
            self.context_length,
            self.batch_size,
            max_batches=max_batches,
            rank=rank,
            world_size=world_size,
        )

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
        return [
            token_split.tokens[offsets[i] : offsets[i + 1] - 1] for i in range(token_split.num_docs)
        ]

    def split_utf8_bytes(self, split: str) -> int:
        """UTF-8 bytes of the split's document texts (EOS separators excluded),
        for bits per byte."""
        return self._split(split).utf8_bytes

    def unigram_entropy(self, split: str = "train") -> float:
        """Entropy in nats/token of the split's unigram distribution:
        the loss of a context-free model."""
        tokens = self.split_tokens(split)
        counts = np.zeros(self.vocab_size, dtype=np.int64)
        for begin in range(0, len(tokens), _BINCOUNT_CHUNK):  # chunked: bincount upcasts to int64
            counts += np.bincount(
                tokens[begin : begin + _BINCOUNT_CHUNK], minlength=self.vocab_size
            )
        probs = counts[counts > 0] / counts.sum()
        return float(-(probs * np.log(probs)).sum())


def build_datamodule(
    cfg: Mapping, ordered_stream: bool, tokenizer: Tokenizer | None = None
) -> LongDocDataModule | MQARDataModule:
    """The DataModule of a composed root config (`data`, `tokenizer`, lengths, batch, seed);
    `tokenizer` replaces the one the config names (eval.py passes a checkpoint's own)."""
    sampling = "ordered" if ordered_stream else "packed"
    if cfg["data"].get("source") == "mqar":  # generated recall examples, no corpus or tokenizer
        return MQARDataModule(
            cfg["data"], cfg["context_length"], cfg["batch_size"], sampling, cfg["seed"]
        )
    return LongDocDataModule(
        data_cfg=cfg["data"],
        tokenizer_cfg=cfg["tokenizer"],
        context_length=cfg["context_length"],
        batch_size=cfg["batch_size"],
        num_workers=cfg["num_workers"],
        sampling=sampling,
        seed=cfg["seed"],
        tokenizer=tokenizer,
    )
