"""Multi-query associative recall (MQAR), the recall probe of Zoology (Arora et al. 2023).

An example of `seq_len` tokens first states `num_pairs` key-value pairs, k0 v0 k1 v1 ...; keys
come from the lower half of the vocabulary and values from the upper half, distinct within the
example. The rest of the sequence is cut into two-token slots. `num_queries` of the stated keys
are asked again, each at the first token of its own slot, and the slot index s follows the power
law p(s) ~ (s + 1) ** (power_a - 1) (slots drawn without replacement), so most queries come soon
after the pairs and a few come much later. Every other position is random filler. The only
supervised targets are the answers: the target at a query's position (the next token to
predict) is the value stated with that key; every other target is -100, the index
F.cross_entropy ignores, so loss and accuracy cover the answer positions alone.

One choice differs from Zoology's generator (HazyResearch/zoology, zoology/data/multiquery_ar.py),
whose filler is uniform over the whole vocabulary: here filler never repeats one of the example's
own keys, so the key's statement and its query are its only occurrences and the recalled value is
unambiguous even with a small vocabulary. Everything is a function of the seed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from longctx.data.config import to_plain_dict
from longctx.errors import ConfigError

IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index: no loss, not scored
# Rows generated together: bounds the temporary [rows, vocab] arrays to a few MiB at any size.
_CELLS_PER_BLOCK = 1 << 21


@dataclass(frozen=True)
class MQARTask:
    """One MQAR setting: vocabulary, length, pairs stated, keys asked and the gap power law."""

    vocab_size: int
    seq_len: int
    num_pairs: int
    num_queries: int | None = None  # None: every stated key is asked once
    power_a: float = 0.01  # 1.0: uniform slots; towards 0: queries crowd right after the pairs

    def __post_init__(self):
        for key in ("vocab_size", "seq_len", "num_pairs"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"mqar: {key} must be a positive integer, got {value!r}")
        where = f"mqar setting seq_len={self.seq_len}, num_pairs={self.num_pairs}"
        if self.vocab_size // 2 < self.num_pairs:
            raise ConfigError(
                f"{where}: vocab_size={self.vocab_size} has {self.vocab_size // 2} keys and values "
                f"in each half, fewer than the pairs; raise data.vocab_size to at least "
                f"{2 * self.num_pairs}"
            )
        if not 1 <= self.queries <= self.num_pairs:
            raise ConfigError(
                f"{where}: num_queries={self.num_queries} must lie in 1..num_pairs "
                "(null asks every key once)"
            )
        if self.slots < self.queries:
            raise ConfigError(
                f"{where}: {self.seq_len - 2 * self.num_pairs} positions after the pairs hold "
                f"{self.slots} two-token query slots, fewer than the {self.queries} queries; "
                f"raise seq_len to at least {2 * self.num_pairs + 2 * self.queries} or ask fewer"
            )
        if not self.power_a > 0:
            raise ConfigError(f"mqar: power_a must be positive (1.0 = uniform), got {self.power_a}")

    @property
    def queries(self) -> int:
        return self.num_pairs if self.num_queries is None else int(self.num_queries)

    @property
    def slots(self) -> int:
        """Two-token slots after the pairs; a query takes the first token of one."""
        return (self.seq_len - 2 * self.num_pairs) // 2

    def slot_probabilities(self) -> np.ndarray:
        """p(s) of slot s for a single draw: proportional to (s + 1) ** (power_a - 1)."""
        weights = np.arange(1, self.slots + 1, dtype=np.float64) ** (self.power_a - 1.0)
        return weights / weights.sum()


@dataclass(frozen=True)
class MQARExamples:
    """inputs and targets: LongTensor[examples, seq_len]; targets are -100 except at answers."""

    inputs: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return self.inputs.shape[0]


def _distinct(rng: np.random.Generator, rows: int, population: int, k: int) -> np.ndarray:
    """[rows, k] distinct integers of range(population) per row, in random order."""
    scores = rng.random((rows, population))
    chosen = np.argpartition(scores, k - 1, axis=1)[:, :k]
    order = np.argsort(np.take_along_axis(scores, chosen, axis=1), axis=1)
    return np.take_along_axis(chosen, order, axis=1)


def _weighted_distinct(rng: np.random.Generator, rows: int, probs: np.ndarray, k: int):
    """[rows, k] draws without replacement with weights `probs` (Efraimidis-Spirakis keys:
    the k largest log(u) / p are the same in law as k successive renormalised draws)."""
    keys = np.log(rng.random((rows, len(probs)))) / probs
    return np.argpartition(-keys, k - 1, axis=1)[:, :k]


def _block(task: MQARTask, rows: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    vocab, pairs, queries = task.vocab_size, task.num_pairs, task.queries
    half = vocab // 2
    keys = _distinct(rng, rows, half, pairs)
    values = half + _distinct(rng, rows, vocab - half, pairs)
    # Filler: uniform over the tokens that are not this row's keys (the r-th non-key token).
    is_key = np.zeros((rows, vocab), dtype=bool)
    np.put_along_axis(is_key, keys, True, axis=1)
    non_keys = np.argsort(is_key, axis=1, kind="stable")[:, : vocab - pairs]
    draws = rng.integers(0, vocab - pairs, size=(rows, task.seq_len))
    inputs = np.take_along_axis(non_keys, draws, axis=1)
    inputs[:, 0 : 2 * pairs : 2] = keys
    inputs[:, 1 : 2 * pairs : 2] = values
    asked = _distinct(rng, rows, pairs, queries)  # which pairs, in random order
    slots = _weighted_distinct(rng, rows, task.slot_probabilities(), queries)
    positions = 2 * pairs + 2 * slots
    np.put_along_axis(inputs, positions, np.take_along_axis(keys, asked, axis=1), axis=1)
    targets = np.full((rows, task.seq_len), IGNORE_INDEX, dtype=np.int64)
    np.put_along_axis(targets, positions, np.take_along_axis(values, asked, axis=1), axis=1)
    return inputs.astype(np.int64), targets


def generate_mqar(task: MQARTask, num_examples: int, seed: int | Sequence[int]) -> MQARExamples:
    """`num_examples` examples of `task`; the same task, count and seed give the same examples."""
    rng = np.random.default_rng(seed)
    rows_per_block = max(1, _CELLS_PER_BLOCK // max(task.vocab_size, task.seq_len))
    blocks = [
        _block(task, min(rows_per_block, num_examples - start), rng)
        for start in range(0, num_examples, rows_per_block)
    ]
    inputs = np.concatenate([b[0] for b in blocks]) if blocks else np.zeros((0, task.seq_len))
    targets = np.concatenate([b[1] for b in blocks]) if blocks else np.zeros((0, task.seq_len))
    return MQARExamples(torch.from_numpy(inputs).long(), torch.from_numpy(targets).long())


def answer_distances(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """For each answer (targets != -100, row-major): tokens from its key's statement to its query.

    The statement is the key's first occurrence in the row (filler never repeats a key).
    """
    rows, positions = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    asked = inputs[rows, positions]
    first = (inputs[rows] == asked[:, None]).int().argmax(dim=1)
    return positions - first


# --- the data config (conf/data/mqar.yaml) and its DataModule ---


@dataclass(frozen=True)
class MQARSetting:
    """One entry of data.train_settings / data.test_settings."""

    seq_len: int
    num_pairs: int
    examples: int

    def task(self, data_cfg: Mapping) -> MQARTask:
        return MQARTask(
            vocab_size=data_cfg["vocab_size"],
            seq_len=self.seq_len,
            num_pairs=self.num_pairs,
            num_queries=data_cfg.get("num_queries"),
            power_a=float(data_cfg.get("power_a", 0.01)),
        )


def parse_settings(entries: Sequence[Mapping] | None, key: str) -> list[MQARSetting]:
    if not entries:
        raise ConfigError(f"data.{key} must list at least one {{seq_len, num_pairs, examples}}")
    settings = []
    for entry in entries:
        if not isinstance(entry, Mapping) or set(entry) != {"seq_len", "num_pairs", "examples"}:
            raise ConfigError(
                f"data.{key} entry {entry!r} must have exactly seq_len, num_pairs and examples"
            )
        examples = entry["examples"]
        if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
            raise ConfigError(f"data.{key} entry {entry!r}: examples must be a positive integer")
        settings.append(MQARSetting(entry["seq_len"], entry["num_pairs"], examples))
    return settings


class MQARSplit(Dataset):
    """Every setting's examples of one split, one after another; `ranges` marks each setting."""

    def __init__(self, parts: list[tuple[MQARSetting, MQARExamples]]):
        self.settings = [setting for setting, _ in parts]
        self.parts = [examples for _, examples in parts]
        starts = np.cumsum([0] + [len(examples) for examples in self.parts])
        self.ranges = [range(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]

    def __len__(self) -> int:
        return self.ranges[-1].stop

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        part = int(np.searchsorted([r.stop for r in self.ranges], index, side="right"))
        offset = index - self.ranges[part].start
        examples = self.parts[part]
        return {"input_ids": examples.inputs[offset], "targets": examples.targets[offset]}


class SettingBatches:
    """Batches that never mix settings (so never lengths): each epoch shuffles the examples
    within every setting, cuts them into full batches and shuffles the batches, seeded by
    (seed, epoch); rank r of w takes every w-th batch. Evaluation batches keep their order.

    `rows(seq_len)` is the batch size of a setting: with data.batch_tokens every batch holds
    about the same number of tokens (and, when pairs grow with length, of answers).
    """

    def __init__(
        self,
        split: MQARSplit,
        rows,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.split, self.rows, self.shuffle = split, rows, shuffle
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, self.epoch])
        batches = []
        for setting, indices in zip(self.split.settings, self.split.ranges):
            order, size = np.asarray(indices), self.rows(setting.seq_len)
            if self.shuffle:
                order = rng.permutation(order)
                order = order[: len(order) // size * size]  # drop_last: only full batches
            batches += [order[i : i + size] for i in range(0, len(order), size)]
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self._batches():
            yield batch.tolist()

    def __len__(self) -> int:
        return len(self._batches())


def _with_reset(batch: list[dict]) -> dict[str, torch.Tensor]:
    """Stack a batch and mark every row as a new stream: examples are independent, so a backend
    trained on ordered streams (state carried between batches) starts each one fresh."""
    stacked = torch.utils.data.default_collate(batch)
    stacked["reset"] = torch.ones(len(batch), dtype=torch.bool)
    return stacked


class MQARDataModule(L.LightningDataModule):
    """data=mqar: generated train / validation / test splits, each from its own seed.

    Training and validation use `data.train_settings` (validation draws `validation_examples`
    fresh examples of each); the test split uses `data.test_settings` and `test_seed`. Batches
    are dicts {"input_ids", "targets"} of one setting each (plus "reset" when ordered).
    """

    def __init__(
        self, data_cfg, context_length: int, batch_size: int, sampling: str = "packed", seed=0
    ):
        super().__init__()
        self.data_cfg = to_plain_dict(data_cfg)
        self.context_length = int(context_length)
        self.batch_size = int(batch_size)
        self.sampling = sampling
        self.seed = int(seed)
        self.train_settings = parse_settings(self.data_cfg.get("train_settings"), "train_settings")
        self.test_settings = parse_settings(self.data_cfg.get("test_settings"), "test_settings")
        for setting in self.train_settings + self.test_settings:
            setting.task(self.data_cfg)  # every setting validated before any generation
            if setting.seq_len > self.context_length:
                raise ConfigError(
                    f"mqar setting seq_len={setting.seq_len} is longer than context_length="
                    f"{self.context_length}; raise context_length to the longest setting"
                )
        tokens = self.data_cfg.get("batch_tokens")
        if tokens is not None and (not isinstance(tokens, int) or tokens < self.longest):
            raise ConfigError(
                f"data.batch_tokens={tokens!r} must be an integer of at least the longest "
                f"setting ({self.longest} tokens), or null for batch_size rows per batch"
            )
        self._splits: dict[str, MQARSplit] = {}

    @property
    def longest(self) -> int:
        return max(s.seq_len for s in self.train_settings + self.test_settings)

    def rows_per_batch(self, seq_len: int) -> int:
        """batch_tokens // seq_len rows when data.batch_tokens is set, else batch_size."""
        tokens = self.data_cfg.get("batch_tokens")
        return tokens // seq_len if tokens else self.batch_size

    @property
    def vocab_size(self) -> int:
        return int(self.data_cfg["vocab_size"])

    def _seeded(self, split: str) -> tuple[list[MQARSetting], int, int | None]:
        """(settings, seed, examples per setting or None for each setting's own count)."""
        cfg = self.data_cfg
        if split == "train":
            return self.train_settings, int(cfg["seed"]), None
        if split == "validation":
            return self.train_settings, int(cfg["validation_seed"]), int(cfg["validation_examples"])
        return self.test_settings, int(cfg["test_seed"]), None

    def split(self, name: str) -> MQARSplit:
        """The split's examples, generated on first use; setting i draws from seed (split's, i)."""
        if name not in self._splits:
            settings, seed, count = self._seeded(name)
            self._splits[name] = MQARSplit(
                [
                    (s, generate_mqar(s.task(self.data_cfg), count or s.examples, (seed, i)))
                    for i, s in enumerate(settings)
                ]
            )
        return self._splits[name]

    def fewest_training_batches(self, world_size: int) -> int:
        """Full training batches of the rank dealt the fewest, as `SettingBatches` deals them."""
        split = self.split("train")
        return len(
            SettingBatches(split, self.rows_per_batch, True, self.seed, world_size - 1, world_size)
        )

    def setup(self, stage: str | None = None) -> None:
        for name in ("train", "validation") if stage == "fit" else ("test",):
            self.split(name)

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        rank, world_size = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        batches = SettingBatches(
            self.split(name), self.rows_per_batch, shuffle, self.seed, rank, world_size
        )
        collate = _with_reset if self.sampling == "ordered" else None
        return DataLoader(self.split(name), batch_sampler=batches, collate_fn=collate)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def unigram_entropy(self, split: str = "train") -> float:
        """Entropy (nats) of the answers' distribution: the loss of a model ignoring context."""
        targets = torch.cat([part.targets.flatten() for part in self.split(split).parts])
        counts = torch.bincount(targets[targets != IGNORE_INDEX], minlength=self.vocab_size)
        probs = counts[counts > 0].double() / counts.sum()
        return float(-(probs * probs.log()).sum())
