"""Load documents from local txt / jsonl / parquet files,
skipping files that hold no usable text and naming the file and line of a malformed record."""

import codecs
import glob
import gzip
import hashlib
import json
import os
import warnings
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
from datasets import Dataset, Value, concatenate_datasets, load_dataset

from longctx.core.files import atomic_write_text
from longctx.data.config import stable_digest, worker_processes
from longctx.errors import ConfigError

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
STRING_TYPES = ("string", "large_string")


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
        raise ConfigError(
            f"no usable document: {len(files)} files match {patterns!r} "
            "and none holds readable text; check data.data_files"
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
    try:
        ds = load_dataset(
            builder, data_files=paths, split="train", cache_dir=cache_dir, num_proc=num_proc
        )
    except Exception as error:  # `datasets` wraps pyarrow's parse errors in its own types
        if builder == "json":
            for path in paths:
                _check_json_lines(path, text_column)
        raise ConfigError(
            f"files {paths[:3]} cannot be read as {builder} ({type(error).__name__}: "
            f"{error.__cause__ or error}); check them, or leave them out of data.data_files"
        ) from None
    if text_column not in ds.column_names:
        raise ConfigError(
            f"files {paths[:3]}... have no text column {text_column!r} "
            f"(columns: {ds.column_names}); set data.text_column"
        )
    feature = ds.features[text_column]
    if not (isinstance(feature, Value) and feature.dtype in STRING_TYPES):
        if builder == "json":
            for path in paths:
                _check_json_lines(path, text_column)
        raise ConfigError(
            f"column {text_column!r} of files {paths[:3]} holds {feature}, not text; "
            "set data.text_column to the column that holds each document's text"
        )
    if title_column not in ds.column_names:
        ds = ds.add_column(title_column, [""] * len(ds))
    renames = {
        old: new for old, new in ((text_column, "text"), (title_column, "title")) if old != new
    }
    ds = ds.select_columns([text_column, title_column]).rename_columns(renames)
    return ds.cast_column("title", Value("string"))


def _check_json_lines(path: str, text_column: str) -> None:
    """A ConfigError naming the first line of a JSON-lines file that is not a JSON object, or
    whose text is neither a string nor null. A file of one JSON document is not checked here."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            if number == 1 and line.lstrip().startswith("["):
                return
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ConfigError(
                    f"{path} line {number} is not valid JSON ({error.msg}, column {error.colno}); "
                    "fix or remove that line"
                ) from None
            if not isinstance(record, dict):
                raise ConfigError(
                    f"{path} line {number} is a JSON {type(record).__name__}, not an object with "
                    f"a {text_column!r} field; fix or remove that line"
                )
            text = record.get(text_column)
            if text is not None and not isinstance(text, str):
                raise ConfigError(
                    f"{path} line {number}: {text_column!r} is a {type(text).__name__}, not a "
                    "string; fix that line, or set data.text_column to the field with the text"
                )


def content_digest(path: str, memo_dir: str | os.PathLike | None = None) -> str:
    """A digest of the file's bytes, so that an edit that keeps its size and mtime still counts.

    Reading a large corpus takes a while, so the digest is kept in `memo_dir` under the file's
    path, size, mtime, inode and ctime: the OS updates ctime on every write and no tool can set
    it back, so an edited file never matches a kept digest.
    """
    stat = os.stat(path)
    key = stable_digest(path, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
    memo = Path(memo_dir) / key if memo_dir is not None else None
    if memo is not None and memo.is_file():
        return memo.read_text().strip()
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        while chunk := handle.read(_READ_CHUNK):
            digest.update(chunk)
    value = digest.hexdigest()
    if memo is not None:
        atomic_write_text(memo, value)
    return value
