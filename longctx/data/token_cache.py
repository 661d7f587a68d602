"""Tokenise a corpus once with `datasets.map` and keep it on disk as flat token streams.

Layout of one cache folder, named by corpus fingerprint + tokenizer identity:
  <split>.tokens.npy       every document's tokens followed by EOS, concatenated
                           (uint16 when the vocabulary fits, else uint32)
  <split>.doc_offsets.npy  int64 start of each document in the stream, plus the stream length
  meta.json                per-split document / token / UTF-8 byte counts
The folder is assembled under a temporary name and renamed into place, so a
reader sees either a complete cache or none. Streams are memory-mapped on load,
so DDP ranks and loader workers share one copy through the page cache.
"""

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
from datasets import DatasetDict, Features, List, Value

from longctx.data.config import worker_processes
from longctx.data.splits import SPLITS
from longctx.data.tokenizer import Tokenizer


@dataclass(frozen=True)
class TokenSplit:
    tokens: np.ndarray
    doc_offsets: np.ndarray
    utf8_bytes: int

    @property
    def num_docs(self) -> int:
        return len(self.doc_offsets) - 1


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size < 2**16 else np.uint32)


def token_cache_path(
    cache_dir: str | os.PathLike, corpus_fingerprint: str, tokenizer: Tokenizer
) -> Path:
    return Path(cache_dir) / "tokens" / f"{corpus_fingerprint}-{tokenizer.identity}"


def _tokenize_batch(texts: list[str], tokenizer: Tokenizer) -> dict:
    ids = tokenizer.encode_batch(texts)
    return {
        "input_ids": [doc + [tokenizer.eos_id] for doc in ids],
        "num_bytes": [len(text.encode("utf-8")) for text in texts],
    }


def build_token_cache(
    corpus: DatasetDict, tokenizer: Tokenizer, target: Path, num_proc: int | None
) -> None:
    """Tokenise every split into `target` (atomically); a no-op when `target` already exists."""
    if target.is_dir():
        return
    staging = target.with_name(f".{target.name}.{os.getpid()}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "arrow").mkdir(parents=True)
    dtype = token_dtype(tokenizer.vocab_size)
    features = Features({"input_ids": List(Value(dtype.name)), "num_bytes": Value("int64")})
    meta = {
        "tokenizer": tokenizer.identity,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "splits": {},
    }
    for split in SPLITS:
        tokenized = corpus[split].map(
            _tokenize_batch,
            batched=True,
            input_columns="text",
            fn_kwargs={"tokenizer": tokenizer},
            remove_columns=corpus[split].column_names,
            features=features,
            num_proc=worker_processes(num_proc),
            cache_file_name=str(staging / "arrow" / f"{split}.arrow"),
            new_fingerprint=f"{target.name}-{split}",
            desc=f"tokenizing {split}",
        )
        meta["splits"][split] = _write_stream(tokenized.data.table, staging, split, dtype)
        del tokenized
    shutil.rmtree(staging / "arrow")
    (staging / "meta.json").write_text(json.dumps(meta, indent=2))
    try:
        os.rename(staging, target)
    except OSError:  # another process finished the same cache first; theirs is identical
        shutil.rmtree(staging, ignore_errors=True)


def _write_stream(table, folder: Path, split: str, dtype: np.dtype) -> dict:
    lengths = (
        pc.list_value_length(table.column("input_ids"))
        .to_numpy(zero_copy_only=False)
        .astype(np.int64)
    )
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = np.lib.format.open_memmap(
        folder / f"{split}.tokens.npy", mode="w+", dtype=dtype, shape=(int(offsets[-1]),)
    )
    position = 0
    for chunk in table.column(
        "input_ids"
    ).chunks:  # chunk by chunk: never the whole stream in memory twice
        values = chunk.flatten().to_numpy(zero_copy_only=False)
        tokens[position : position + len(values)] = values
        position += len(values)
    tokens.flush()
    del tokens
    np.save(folder / f"{split}.doc_offsets.npy", offsets)
    return {
        "num_docs": len(lengths),
        "num_tokens": int(offsets[-1]),
        "utf8_bytes": int(pc.sum(table.column("num_bytes")).as_py() or 0),
    }


def load_token_split(target: Path, split: str) -> TokenSplit:
    meta = json.loads((target / "meta.json").read_text())
    return TokenSplit(
        tokens=np.load(target / f"{split}.tokens.npy", mmap_mode="r"),
        doc_offsets=np.load(target / f"{split}.doc_offsets.npy"),
        utf8_bytes=meta["splits"][split]["utf8_bytes"],
    )
