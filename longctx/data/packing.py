"""Two ways to cut a flat token stream (documents joined by EOS) into training examples.

PackedWindows: map-style; window i is tokens[i*N : i*N + N + 1], so windows tile
the stream without overlapping targets. Training draws them through a
ResumableShardSampler: each DDP rank gets different windows, each epoch its own
seeded order, and a resumed run can start the epoch part-way through.

OrderedStream: iterable; the stream is cut into `batch_size * world_size`
contiguous rows, each rank owns `batch_size` of them, and batch t holds the
t-th chunk of N tokens of every row, so batch t+1 continues each row where
batch t stopped (what Transformer-XL style memory needs). It is iterable
rather than map-style precisely so Lightning does not insert a
DistributedSampler that would deal whole batches to different ranks. Use it
with `DataLoader(batch_size=None)`; with K workers, worker k yields batches
k, k+K, ..., which the DataLoader's in-order round robin reassembles as 0, 1, 2, ...
Setting `start_batch` makes the next iteration begin at that batch (exact resume).
"""

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler, IterableDataset, get_worker_info


def _as_long(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(array, dtype=np.int64))


class PackedWindows(Dataset):
    """Windows of context_length + 1 tokens; input_ids = w[:-1], targets = w[1:]."""

    def __init__(self, tokens: np.ndarray, context_length: int, max_windows: int | None = None):
        total = (len(tokens) - 1) // context_length
        if total < 1:
            raise ValueError(
                f"a stream of {len(tokens)} tokens is shorter than one window of "
                f"context_length + 1 = {context_length + 1}"
            )
        self.tokens = tokens
        self.context_length = context_length
        # Capped evaluation keeps windows spread over the whole split
        # instead of the first few documents.
        self.starts = (
            np.arange(total)
            if not max_windows or max_windows >= total
            else np.linspace(0, total - 1, max_windows).round().astype(np.int64)
        )

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        begin = int(self.starts[index]) * self.context_length
        window = _as_long(self.tokens[begin : begin + self.context_length + 1])
        return {"input_ids": window[:-1], "targets": window[1:]}


class ResumableShardSampler(DistributedSampler):
    """This rank's share of a seeded per-epoch shuffle, optionally starting part-way through.

    The order is a function of (seed, epoch) only, like DistributedSampler's, so a resumed run
    redraws exactly the epoch it stopped in. Being a DistributedSampler, Lightning keeps it
    instead of injecting its own under DDP. drop_last drops the at most world_size - 1 windows
    that do not divide among the ranks, rather than repeating some.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.start_index = 0  # where the next iteration begins in this rank's share

    def __iter__(self):
        return iter(list(super().__iter__())[self.start_index :])


def distributed_rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class OrderedStream(IterableDataset):
    """Batches {"input_ids", "targets": [B, N], "reset": bool[B]} continuing each row across steps.

    reset[r] is True when row r's chunk starts a new document (or the row itself),
    i.e. when memory carried from the previous chunk belongs to another document.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        doc_offsets: np.ndarray,
        context_length: int,
        batch_size: int,
        max_batches: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        self.tokens = tokens
        self.doc_starts = np.asarray(doc_offsets[:-1], dtype=np.int64)
        self.context_length = context_length
        self.batch_size = batch_size
        self.max_batches = max_batches
        self.rank, self.world_size = rank, world_size
        self.start_batch = 0  # where the next iteration begins

    def _rank_and_world(self) -> tuple[int, int]:
        # Read at iteration time:
        # the process group exists by then even if it did not at construction.
        if self.rank is not None and self.world_size is not None:
            return self.rank, self.world_size
        return distributed_rank_and_world()

    def _row_length(self) -> int:
        _, world_size = self._rank_and_world()
        return len(self.tokens) // (self.batch_size * world_size)

    def __len__(self) -> int:
        batches = (self._row_length() - 1) // self.context_length
        if batches < 1:
            raise ValueError(
                f"{len(self.tokens)} tokens cannot fill {self.batch_size} rows per rank of "
                f"context_length + 1 = {self.context_length + 1}"
            )
        return min(batches, self.max_batches) if self.max_batches else batches

    def __iter__(self):
        rank, _ = self._rank_and_world()
        row_length, n = self._row_length(), self.context_length
        row_starts = (rank * self.batch_size + np.arange(self.batch_size)) * row_length
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        for step in range(self.start_batch + worker_id, len(self), num_workers):
            begins = row_starts + step * n
            rows = np.stack([self.tokens[b : b + n + 1] for b in begins])
            reset = np.isin(begins, self.doc_starts) | (step == 0)
            batch = _as_long(rows)
            yield {
                "input_ids": batch[:, :-1],
                "targets": batch[:, 1:],
                "reset": torch.from_numpy(reset),
            }
