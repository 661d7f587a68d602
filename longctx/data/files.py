"""Load documents from local txt / jsonl / parquet files,
skipping files that hold no usable text."""

import codecs
import glob
import gzip
import os
import warnings
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
from datasets import Dataset, Value, concatenate_datasets, load_dataset

from longctx.data.config import worker_processes

# load_dataset builder per file suffix; compressed json is decompressed by `datasets` itself.
BUILDER_BY_SUFFIX = {
    ".txt": "text",
    ".md": "text",
    ".text": "text",
    ".jsonl": "json",
    ".json": "json",
    ".jsonl.gz": "json",
    ".json.gz": "json",
    ".parquet": "parquet",
}
_READ_CHUNK = 1 << 20


def expand_patterns(patterns: str | list[str]) -> list[str]:
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    return sorted(
        {
            os.path.abspath(p)
            for pattern in patterns
            for p in glob.glob(os.path.expanduser(pattern), recursive=True)
            if os.path.isfile(p)
        }
    )


def builder_for(path: str) -> str | None:
    name = Path(path).name.lower()
    return next(
        (builder for suffix, builder in BUILDER_BY_SUFFIX.items() if name.endswith(suffix)), None
    )


def file_problem(path: str, builder: str | None) -> str | None:
    """Why a file cannot be used ("empty", "binary", ...), or None if it is fine."""
    if builder is None:
        return "unsupported suffix"
    if os.path.getsize(path) == 0:
        return "empty"
    if builder == "parquet":
        try:
            return "empty" if pq.ParquetFile(path).metadata.num_rows == 0 else None
        except Exception:
            return "unreadable parquet"
    return _text_problem(path)


def _text_problem(path: str) -> str | None:
    """Stream the file through a strict UTF-8 decoder:
    NUL bytes mean binary, bad sequences undecodable."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    opener = gzip.open if path.endswith(".gz") else open
    has_text = False
    try:
        with opener(path, "rb") as handle:
            while chunk := handle.read(_READ_CHUNK):
                if b"\x00" in chunk:
                    return "binary"
                has_text = has_text or bool(decoder.decode(chunk).strip())
            decoder.decode(b"", final=True)
    except (UnicodeDecodeError, OSError, EOFError):
        return "undecodable"
    return None if has_text else "empty"


def load_document_files(
    patterns: str | list[str],
    text_column: str,
    title_column: str,
    num_proc: int | None,
    cache_dir: str,
) -> Dataset:
    """One Dataset with columns text and title from every usable file matching the patterns."""
    files = expand_patterns(patterns)
    usable: dict[str, list[str]] = {}
    problems: dict[str, str] = {}
    for path in files:
        builder = builder_for(path)
        problem = file_problem(path, builder)
        if problem:
            problems[path] = problem
        else:
            usable.setdefault(builder, []).append(path)
    if problems:
        counts = ", ".join(f"{n} {why}" for why, n in sorted(Counter(problems.values()).items()))
        examples = ", ".join(Path(p).name for p in list(problems)[:5])
        warnings.warn(
            f"skipped {len(problems)} of {len(files)} files matching {patterns!r} "
            f"({counts}): {examples}",
            stacklevel=2,
        )
    if not usable:
        raise ValueError(
            f"no usable document: {len(files)} files match {patterns!r} "
            "and none holds readable text"
        )
    parts = [
        _load_builder(builder, paths, text_column, title_column, num_proc, cache_dir)
        for builder, paths in sorted(usable.items())
    ]
    return concatenate_datasets(parts)


def _load_builder(
    builder: str,
    paths: list[str],
    text_column: str,
    title_column: str,
    num_proc: int | None,
    cache_dir: str,
) -> Dataset:
    num_proc = worker_processes(num_proc) if len(paths) > 1 else None
    if builder == "text":
        # One example per file (a book is one document), titled by its file name.
        ds = load_dataset(
            "text",
            data_files=paths,
            split="train",
            sample_by="document",
            cache_dir=cache_dir,
            num_proc=num_proc,
        )
        return ds.add_column("title", [Path(p).stem for p in paths])
    ds = load_dataset(
        builder, data_files=paths, split="train", cache_dir=cache_dir, num_proc=num_proc
    )
    if text_column not in ds.column_names:
        raise ValueError(
            f"files {paths[:3]}... have no text column {text_column!r} "
            f"(columns: {ds.column_names}); set data.text_column"
        )
    if title_column not in ds.column_names:
        ds = ds.add_column(title_column, [""] * len(ds))
    renames = {
        old: new for old, new in ((text_column, "text"), (title_column, "title")) if old != new
    }
    ds = ds.select_columns([text_column, title_column]).rename_columns(renames)
    return ds.cast_column("title", Value("string"))
