"""`load_corpus`: a data config -> DatasetDict(train, validation, test) of whole documents.

Sources (`data.source`):
  files      local txt/jsonl/parquet globs (the bundled corpus and `local`)
  hub        a Hugging Face dataset id with parquet files (pg19, wikitext103, proof_pile);
             setting `data_files` points the very same processing at local copies
  synthetic  generated documents with planted long-range facts (see synthetic.py)
Splits: a `data_files` mapping {train, validation, test} of globs is used as given, and so are
a hub dataset's own splits (renamed by `splits`). `split_fractions` splits one pool of documents
by document: a glob or list of globs, a synthetic corpus, or a hub dataset whose config asks
for it; it never re-splits splits the user gave.
"""

import logging
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import fields

from datasets import Dataset, DatasetDict, concatenate_datasets, load_dataset

from longctx.data.config import stable_digest, to_plain_dict, worker_processes
from longctx.data.files import content_digest, expand_patterns, load_document_files
from longctx.data.splits import SPLITS, split_by_document
from longctx.data.synthetic import FactSettings, generate_synthetic_documents
from longctx.errors import ConfigError

log = logging.getLogger(__name__)

# Bump when the processing below changes, so caches keyed on the fingerprint are rebuilt.
PROCESSING_VERSION = 2  # 2: synthetic documents state several facts (FactSettings)
# WikiText marks an article's first line as " = Title = "; section headings use "= =".
WIKITEXT_ARTICLE_HEADING = re.compile(r"^ = ([^=].*) = $")
# Keys that change where or how fast a corpus is built, not what it contains.
NON_CONTENT_KEYS = {"num_proc", "cache_dir", "max_eval_windows"}


def hf_cache_dir(cfg: dict) -> str:
    return os.path.join(cfg["cache_dir"], "hf")


def corpus_fingerprint(data_cfg) -> str:
    """Identity of a corpus: its content-defining config plus the size and content digest of
    each local file (an edit that keeps a file's size and mtime still changes it)."""
    cfg = to_plain_dict(data_cfg)
    content = {k: v for k, v in cfg.items() if k not in NON_CONTENT_KEYS}
    data_files = cfg.get("data_files")
    patterns = (
        [p for v in data_files.values() for p in ([v] if isinstance(v, str) else v)]
        if isinstance(data_files, dict)
        else data_files
    )
    memo = os.path.join(cfg["cache_dir"], "digests") if cfg.get("cache_dir") else None
    stats = (
        [(p, os.path.getsize(p), content_digest(p, memo)) for p in expand_patterns(patterns)]
        if patterns
        else []
    )
    return stable_digest(PROCESSING_VERSION, content, stats)


def load_corpus(data_cfg) -> DatasetDict:
    """DatasetDict with splits train/validation/test;
    every row is one document with "text" (and "title")."""
    cfg = to_plain_dict(data_cfg)
    num_proc = worker_processes(cfg.get("num_proc"))
    raw = _load_source(cfg)
    if cfg.get("group_lines") == "wikitext":
        raw = DatasetDict({name: group_wikitext_articles(ds, cfg) for name, ds in raw.items()})
    raw = DatasetDict({name: _drop_empty(ds, name, num_proc) for name, ds in raw.items()})
    given_splits = isinstance(cfg.get("data_files"), dict)
    if cfg.get("split_fractions") and not given_splits:
        pool = (
            concatenate_datasets(list(raw.values())) if len(raw) > 1 else next(iter(raw.values()))
        )
        if len(pool) == 0:
            raise ConfigError(
                f"no usable document in corpus {cfg.get('name')!r} ({_describe_source(cfg)})"
            )
        return split_by_document(
            pool, cfg["split_fractions"], int(cfg.get("split_seed", 0)), num_proc
        )
    if given_splits and cfg.get("split_fractions"):
        log.info(
            "data.data_files gives the splits %s: used as given, data.split_fractions does not "
            "apply",
            sorted(cfg["data_files"]),
        )
    names = cfg.get("splits") or {s: s for s in SPLITS}
    missing = [names[s] for s in SPLITS if names[s] not in raw]
    if missing:
        fix = (
            "give data.data_files a glob for each of train, validation and test, or one glob "
            "that data.split_fractions splits"
            if given_splits
            else "set data.splits or data.split_fractions"
        )
        raise ConfigError(
            f"corpus {cfg.get('name')!r} has splits {list(raw)}, not {missing}; {fix}"
        )
    corpus = DatasetDict({s: raw[names[s]] for s in SPLITS})
    empty = [s for s, ds in corpus.items() if len(ds) == 0]
    if empty:
        raise ConfigError(
            f"no usable document in split(s) {empty} of corpus {cfg.get('name')!r} "
            f"({_describe_source(cfg)})"
        )
    return corpus


def _describe_source(cfg: dict) -> str:
    return (
        f"data_files={cfg['data_files']!r}"
        if cfg.get("data_files")
        else f"hub_id={cfg.get('hub_id')!r}"
    )


def _load_source(cfg: dict) -> DatasetDict:
    source = cfg["source"]
    if source == "synthetic":
        return DatasetDict({"train": load_synthetic(cfg)})
    text_column, title_column = cfg.get("text_column", "text"), cfg.get("title_column", "title")
    if source == "hub" and not cfg.get("data_files"):
        loaded = load_dataset(
            cfg["hub_id"],
            cfg.get("hub_config"),
            revision=cfg.get("revision"),
            cache_dir=hf_cache_dir(cfg),
            num_proc=worker_processes(cfg.get("num_proc")),
        )
        return DatasetDict(
            {name: _standard_columns(ds, text_column, title_column) for name, ds in loaded.items()}
        )
    if source not in ("files", "hub"):
        raise ConfigError(f"unknown data.source {source!r}; expected files, hub or synthetic")
    data_files = cfg.get("data_files")
    if not data_files:
        raise ConfigError(
            f"corpus {cfg.get('name')!r} needs data.data_files "
            "(a glob, a list of globs, or split -> globs)"
        )
    per_split = data_files if isinstance(data_files, dict) else {"train": data_files}
    _refuse_files_in_two_splits(per_split)
    return DatasetDict(
        {
            name: load_document_files(
                patterns, text_column, title_column, cfg.get("num_proc"), hf_cache_dir(cfg)
            )
            for name, patterns in per_split.items()
        }
    )


def _refuse_files_in_two_splits(per_split: dict) -> None:
    """Splits given as globs must not share a file: its documents would be trained on and
    held out at once."""
    seen: dict[str, str] = {}
    for split, patterns in per_split.items():
        for path in expand_patterns(patterns):
            if path in seen and seen[path] != split:
                raise ConfigError(
                    f"{path} matches the data.data_files globs of both {seen[path]!r} and "
                    f"{split!r}; each file must belong to one split"
                )
            seen[path] = split


def _standard_columns(ds: Dataset, text_column: str, title_column: str) -> Dataset:
    if title_column not in ds.column_names:
        ds = ds.add_column(title_column, [""] * len(ds))
    renames = {
        old: new for old, new in ((text_column, "text"), (title_column, "title")) if old != new
    }
    return ds.select_columns([text_column, title_column]).rename_columns(renames)


def _drop_empty(ds: Dataset, split: str, num_proc: int | None) -> Dataset:
    kept = ds.filter(
        lambda texts: [bool(t and t.strip()) for t in texts],
        input_columns="text",
        batched=True,
        num_proc=num_proc,
        desc="dropping empty documents",
    )
    if len(kept) < len(ds):
        warnings.warn(
            f"dropped {len(ds) - len(kept)} empty documents from split {split!r}", stacklevel=3
        )
    return kept


def _wikitext_articles(lines: Dataset) -> Iterator[dict]:
    title, parts = None, []
    for batch in lines.iter(batch_size=10_000):
        for line in batch["text"]:
            heading = WIKITEXT_ARTICLE_HEADING.match(line.rstrip("\n"))
            if heading:
                if parts and "".join(parts).strip():
                    yield {"text": "".join(parts), "title": title or ""}
                title, parts = heading.group(1).strip(), []
            parts.append(line)
    if parts and "".join(parts).strip():
        yield {"text": "".join(parts), "title": title or ""}


def group_wikitext_articles(lines: Dataset, cfg: dict) -> Dataset:
    """WikiText stores one line per row;
    rebuild whole articles so splits and streams see documents."""
    return Dataset.from_generator(
        _wikitext_articles, gen_kwargs={"lines": lines}, cache_dir=hf_cache_dir(cfg)
    )


def load_synthetic(cfg: dict) -> Dataset:
    # A tuple, not a list: from_generator treats list-valued gen_kwargs as shards to split.
    distances = tuple(int(d) for d in cfg["distances"])
    # Keys the config leaves out take FactSettings' defaults.
    settings = FactSettings(**{f.name: cfg[f.name] for f in fields(FactSettings) if f.name in cfg})
    kwargs = {
        "num_docs": int(cfg["num_docs"]),
        "distances": distances,
        "seed": int(cfg["seed"]),
        "prefix_chars": int(cfg.get("prefix_chars", 200)),
        "settings": settings,
    }
    return Dataset.from_generator(
        generate_synthetic_documents, gen_kwargs=kwargs, cache_dir=hf_cache_dir(cfg)
    )
