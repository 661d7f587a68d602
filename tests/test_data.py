"""Data layer: corpora and splits, tokenizers, the token cache, packed and ordered sampling."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import compose_config
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, DistributedSampler

import longctx.data.datamodule as datamodule_module
from longctx.data import (
    LongDocDataModule,
    OrderedStream,
    PackedWindows,
    build_tokenizer,
    corpus_fingerprint,
    load_corpus,
)
from longctx.data.splits import split_counts
from longctx.data.synthetic import FactSettings, generate_synthetic_documents
from longctx.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("train", "validation", "test")


def data_config(name: str, cache_dir: Path, **overrides):
    """conf/data/<name>.yaml resolved against a minimal root config, caches under cache_dir."""
    root = OmegaConf.create(
        {
            "paths": {"root_dir": str(ROOT), "data_dir": str(ROOT / "data")},
            "seed": 0,
            "context_length": 64,
        }
    )
    root.data = OmegaConf.load(ROOT / "conf" / "data" / f"{name}.yaml")
    root.data.cache_dir = str(cache_dir)
    for key, value in overrides.items():
        root.data[key] = value
    return root.data


def small_synthetic(cache_dir: Path, **overrides):
    return data_config("synthetic", cache_dir, num_docs=60, distances=[64, 512], **overrides)


@pytest.fixture(scope="module")
def bundled_byte(tmp_path_factory) -> LongDocDataModule:
    dm = LongDocDataModule(
        data_config("bundled", tmp_path_factory.mktemp("bundled")),
        {"name": "byte"},
        context_length=128,
        batch_size=4,
    )
    dm.prepare_data()
    dm.setup("fit")
    return dm


# --- corpora and splits -------------------------------------------------------------


def test_bundled_splits_are_disjoint_by_document(tmp_path):
    corpus = load_corpus(data_config("bundled", tmp_path))
    titles = {s: list(corpus[s]["title"]) for s in SPLITS}
    texts = {s: set(corpus[s]["text"]) for s in SPLITS}
    all_titles = [t for s in SPLITS for t in titles[s]]
    # One edition per work: 42 works, each title once, so no First Folio twin can straddle splits.
    assert len(all_titles) == len(set(all_titles)) == 42
    assert all(len(titles[s]) > 0 for s in SPLITS)
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                assert not texts[a] & texts[b]
    again = load_corpus(data_config("bundled", tmp_path / "again"))
    assert {s: list(again[s]["title"]) for s in SPLITS} == titles


def test_split_counts_give_every_split_a_document():
    assert split_counts(5, {"train": 0.9, "validation": 0.05, "test": 0.05}) == {
        "train": 3,
        "validation": 1,
        "test": 1,
    }
    with pytest.raises(ValueError, match="cannot fill"):
        split_counts(2, {"train": 0.8, "validation": 0.1, "test": 0.1})


def write_local_files(folder: Path) -> None:
    folder.mkdir()
    (folder / "book_a.txt").write_text(
        "Call me Ishmael.\nSome years ago, never mind how long.\n" * 20
    )
    (folder / "book_b.txt").write_text(
        "It was the best of times, it was the worst of times.\n" * 20
    )
    (folder / "empty.txt").write_text("")
    (folder / "image.txt").write_bytes(bytes(range(256)) * 8)
    (folder / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    with open(folder / "notes.jsonl", "w") as handle:
        for i in range(3):
            handle.write(json.dumps({"text": f"Note {i}. " * 30, "title": f"note-{i}"}) + "\n")
    pq.write_table(
        pa.table({"text": [f"Parquet document {i}. " * 30 for i in range(3)]}),
        folder / "docs.parquet",
    )


def test_local_corpus_loads_txt_jsonl_parquet_and_skips_unusable_files(tmp_path):
    write_local_files(tmp_path / "docs")
    cfg = data_config(
        "local", tmp_path / "cache", data_files=str(tmp_path / "docs" / "*"), num_proc=1
    )
    with pytest.warns(UserWarning, match=r"skipped 3 of 7 files.*1 binary, 1 empty, 1 undecodable"):
        corpus = load_corpus(cfg)
    docs = [row for s in SPLITS for row in corpus[s]]
    assert len(docs) == 8  # 2 txt + 3 jsonl rows + 3 parquet rows
    titles = {row["title"] for row in docs}
    assert {"book_a", "book_b", "note-0"} <= titles
    assert all(row["text"].strip() for row in docs)


def test_corpus_without_usable_document_fails_naming_the_glob(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "empty.txt").write_text("")
    pattern = str(tmp_path / "docs" / "*.txt")
    with (
        pytest.warns(UserWarning, match="1 empty"),
        pytest.raises(ValueError, match="no usable document") as error,
    ):
        load_corpus(data_config("local", tmp_path / "cache", data_files=pattern))
    assert pattern in str(error.value)


def test_explicit_splits_are_kept_and_a_held_out_file_never_reaches_training(tmp_path):
    """local.yaml sets split_fractions too: a {train, validation, test} mapping must win."""
    docs = tmp_path / "docs"
    for split, count in (("train", 4), ("validation", 2), ("test", 2)):
        (docs / split).mkdir(parents=True)
        for i in range(count):
            (docs / split / f"{split}{i}.txt").write_text(f"HELD-{split}-{i} " * 40)
    files = {split: str(docs / split / "*.txt") for split in SPLITS}
    cfg = data_config("local", tmp_path / "cache", data_files=files, num_proc=1)
    assert cfg.split_fractions  # the preset's pooling settings are present, and ignored
    corpus = load_corpus(cfg)
    for split in SPLITS:
        assert sorted(corpus[split]["title"]) == sorted(p.stem for p in (docs / split).iterdir())
    dm = LongDocDataModule(cfg, {"name": "byte"}, context_length=32, batch_size=2)
    dm.prepare_data()
    trained_text = dm.tokenizer.decode(dm.split_tokens("train"))
    assert "HELD-train-0" in trained_text
    assert "HELD-test" not in trained_text and "HELD-validation" not in trained_text


def test_a_file_in_two_explicit_splits_is_refused(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "book.txt").write_text("A book. " * 40)
    both = str(tmp_path / "docs" / "*.txt")
    files = {"train": both, "validation": both, "test": both}
    with pytest.raises(ConfigError, match=r"book.txt matches the data.data_files globs of both"):
        load_corpus(data_config("local", tmp_path / "cache", data_files=files, num_proc=1))


@pytest.mark.parametrize(
    "lines,message",
    [
        (['{"text": "fine"}', '{"text": "broken" '], r"notes.jsonl line 2 is not valid JSON"),
        (['{"text": "fine"}', '{"text": 5}'], r"notes.jsonl line 2: 'text' is a int, not a string"),
        (['{"text": 5}', '{"text": 6}'], r"notes.jsonl line 1: 'text' is a int, not a string"),
        (['{"text": "fine"}', '["a", "list"]'], r"notes.jsonl line 2 is a JSON list, not an"),
        (['{"text": ["a"]}'], r"notes.jsonl line 1: 'text' is a list, not a string"),
    ],
    ids=["malformed", "mixed types", "numbers only", "not an object", "a list"],
)
def test_bad_jsonl_records_name_their_file_and_line(tmp_path, lines, message):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.jsonl").write_text("\n".join(lines) + "\n")
    cfg = data_config(
        "local", tmp_path / "cache", data_files=str(tmp_path / "docs" / "*.jsonl"), num_proc=1
    )
    with pytest.raises(ConfigError, match=message):
        load_corpus(cfg)


def test_a_non_text_parquet_column_is_named(tmp_path):
    (tmp_path / "docs").mkdir()
    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "docs" / "numbers.parquet")
    cfg = data_config(
        "local", tmp_path / "cache", data_files=str(tmp_path / "docs" / "*.parquet"), num_proc=1
    )
    with pytest.raises(ConfigError, match=r"column 'text' of files .*numbers.parquet.* not text"):
        load_corpus(cfg)


def test_pg19_code_path_on_local_parquet(tmp_path):
    files = {}
    for split, n in zip(SPLITS, (4, 2, 2)):
        files[split] = str(tmp_path / f"{split}.parquet")
        table = pa.table(
            {
                "short_book_title": [f"{split} book {i}" for i in range(n)],
                "publication_date": [1900 + i for i in range(n)],
                "url": ["https://example.invalid"] * n,
                "text": [f"The {split} book number {i}. " * 50 for i in range(n)],
            }
        )
        pq.write_table(table, files[split])
    corpus = load_corpus(data_config("pg19", tmp_path / "cache", data_files=files, num_proc=1))
    assert {s: len(corpus[s]) for s in SPLITS} == {"train": 4, "validation": 2, "test": 2}
    assert corpus["validation"][0]["title"] == "validation book 0"
    assert corpus["train"].column_names == ["text", "title"]


def test_wikitext_lines_are_regrouped_into_articles(tmp_path):
    def article(title: str) -> list[str]:
        return [
            f" = {title} = \n",
            "",
            f" {title} is a topic . \n",
            " = = History = = \n",
            " It has a history . \n",
        ]

    files = {}
    for split in SPLITS:
        files[split] = str(tmp_path / f"{split}.parquet")
        pq.write_table(
            pa.table({"text": [""] + article(f"{split} A") + article(f"{split} B")}), files[split]
        )
    corpus = load_corpus(
        data_config("wikitext103", tmp_path / "cache", data_files=files, num_proc=1)
    )
    assert list(corpus["test"]["title"]) == ["test A", "test B"]
    assert (
        "= = History = =" in corpus["test"][0]["text"] and "test B" not in corpus["test"][0]["text"]
    )


def test_synthetic_corpus_is_deterministic_and_answers_come_far_after_the_fact(tmp_path):
    first = list(generate_synthetic_documents(12, (64, 512, 2048), seed=7))
    assert first == list(generate_synthetic_documents(12, (64, 512, 2048), seed=7))
    assert first != list(generate_synthetic_documents(12, (64, 512, 2048), seed=8))
    for i, doc in enumerate(first):
        (fact_start, fact_end), (answer_start, answer_end) = (
            doc["fact_char_spans"][0],
            doc["answer_char_spans"][0],
        )
        answer = doc["text"][answer_start:answer_end]
        assert answer.isdigit() and answer == doc["text"][fact_start:fact_end]
        assert answer_start - fact_start == doc["distance"] >= (64, 512, 2048)[i % 3]
    corpus = load_corpus(small_synthetic(tmp_path))
    assert sum(len(corpus[s]) for s in SPLITS) == 60
    assert "answer_char_spans" in corpus["train"].column_names


def test_synthetic_documents_with_several_long_codes_ask_for_each_fact_after_the_distance(tmp_path):
    for i, doc in enumerate(
        generate_synthetic_documents(
            9, (64, 256, 300), seed=2, settings=FactSettings(facts=3, code_length=8)
        )
    ):
        text, facts, answers = doc["text"], doc["fact_char_spans"], doc["answer_char_spans"]
        assert len(facts) == len(answers) == 3
        stated = [text[a:b] for a, b in facts]
        assert [text[a:b] for a, b in answers] == stated and all(
            len(c) == 8 and c.isdigit() for c in stated
        )
        gaps = [answer[0] - fact[0] for fact, answer in zip(facts, answers)]
        assert doc["distance"] == min(gaps) >= (64, 256, 300)[i % 3]
        # each answer follows the question about the name whose code was stated there
        for (fact_start, _), (answer_start, _) in zip(facts, answers):
            name = text[:fact_start].rsplit("The code of ", 1)[1].removesuffix(" is ")
            assert text[:answer_start].endswith(f"Answer: the code of {name} is ")
    corpus = load_corpus(small_synthetic(tmp_path, facts=2, code_length=6))
    assert all(len(spans) == 2 for spans in corpus["test"]["answer_char_spans"])
    plain = next(
        generate_synthetic_documents(
            1, (256,), seed=3, settings=FactSettings(facts=2, distractor_rate=0.0)
        )
    )
    assert len(re.findall(r"\d+", plain["text"])) == 4  # two facts, two answers, no other codes
    for bad in ({"facts": 0}, {"alphabet": "hex"}, {"distractor_rate": 1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            FactSettings(**bad)


def test_synthetic_copy_preset_asks_for_one_long_code_beyond_a_64_token_window(tmp_path):
    cfg = compose_config(
        "data=synthetic_copy", "data.num_docs=20", f"data.cache_dir={tmp_path}"
    ).data
    corpus = load_corpus(cfg)
    for doc in corpus["test"]:
        ((fact_start, fact_end),), ((answer_start, answer_end),) = (
            doc["fact_char_spans"],
            doc["answer_char_spans"],
        )
        assert doc["text"][answer_start:answer_end] == doc["text"][fact_start:fact_end]
        assert answer_end - answer_start == 192
        # past the 4 x 63 = 252 tokens a 64-token window reaches through model=mini's 4 layers
        assert doc["distance"] > 4 * 63
        assert "miller" not in doc["text"]  # no filler between the code and its question


def test_alnum_codes_use_distinct_characters():
    settings = FactSettings(code_length=20, alphabet="alnum", distractor_rate=0.0)
    for doc in generate_synthetic_documents(5, (256,), seed=4, prefix_chars=0, settings=settings):
        ((start, end),) = doc["answer_char_spans"]
        code = doc["text"][start:end]
        assert len(set(code)) == 20 and re.fullmatch(r"[A-Z0-9]{20}", code)


# --- tokenizers ------------------------------------------------------------------------

SAMPLE = "To be, or not to be: that is the question.\n\tCafé, naïve, 東京, 🦊!  "


def test_byte_tokenizer_round_trip():
    tok = build_tokenizer({"name": "byte"})
    ids = tok.encode(SAMPLE)
    assert tok.vocab_size == 257 and tok.eos_id == 256 and max(ids) < 256
    assert tok.decode(ids) == SAMPLE
    assert tok.decode(ids + [tok.eos_id]) == SAMPLE
    assert tok.encode_batch([SAMPLE, "x"]) == [ids, [ord("x")]]


def test_bpe_tokenizer_round_trip_and_cache(tmp_path):
    texts = [SAMPLE * 3, "the quick brown fox jumps over the lazy dog " * 40]
    tok = build_tokenizer(
        {"name": "bpe", "vocab_size": 320}, texts, tmp_path, corpus_fingerprint="abc"
    )
    for text in (SAMPLE, "unseen wörds ∑ 🦊\n"):
        assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size <= 320 and tok.eos_id is not None
    assert len(tok.encode("the quick brown fox")) < len("the quick brown fox")
    cached = build_tokenizer(
        {"name": "bpe", "vocab_size": 320}, None, tmp_path, corpus_fingerprint="abc"
    )
    assert cached.identity == tok.identity


def test_file_tokenizer_loads_a_tokenizer_json(tmp_path):
    trained = build_tokenizer({"name": "bpe", "vocab_size": 300}, [SAMPLE * 5])
    path = tmp_path / "tokenizer.json"
    trained.model.save(str(path))
    tok = build_tokenizer({"name": "file", "path": str(path), "eos_token": "<|endoftext|>"})
    assert tok.encode(SAMPLE) == trained.encode(SAMPLE) and tok.eos_id == trained.eos_id


# --- token cache --------------------------------------------------------------------------


def test_token_cache_is_reused(tmp_path, monkeypatch):
    cfg = small_synthetic(tmp_path)
    first = LongDocDataModule(
        cfg, {"name": "bpe", "vocab_size": 300}, context_length=32, batch_size=2
    )
    first.prepare_data()
    first.setup("fit")
    stream = first.token_cache / "train.tokens.npy"
    stamp = stream.stat().st_mtime_ns

    calls = []
    real_build = datamodule_module.build_token_cache
    monkeypatch.setattr(
        datamodule_module,
        "build_token_cache",
        lambda *a, **k: calls.append(1) or real_build(*a, **k),
    )
    monkeypatch.setattr(
        datamodule_module,
        "load_corpus",
        lambda cfg: pytest.fail("a cache hit must not load the corpus"),
    )
    second = LongDocDataModule(
        cfg, {"name": "bpe", "vocab_size": 300}, context_length=32, batch_size=2
    )
    second.prepare_data()
    second.setup("fit")
    assert calls == [] and stream.stat().st_mtime_ns == stamp
    assert second.tokenizer.identity == first.tokenizer.identity
    np.testing.assert_array_equal(
        second.split_tokens("validation"), first.split_tokens("validation")
    )
    assert not [
        p for p in first.token_cache.parent.iterdir() if p.name.startswith(".")
    ]  # no leftover staging dir


def test_an_edit_that_keeps_size_and_mtime_changes_the_corpus_identity(tmp_path):
    book = tmp_path / "docs" / "book.txt"
    book.parent.mkdir()
    book.write_text("The cat sat on the mat. " * 40)
    cfg = data_config("local", tmp_path / "cache", data_files=str(book), num_proc=1)
    before = corpus_fingerprint(cfg)
    assert corpus_fingerprint(cfg) == before  # stable, and now served from the digest memo
    stat = book.stat()
    book.write_text("The dog sat on the mat. " * 40)  # same size
    os.utime(book, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime, as rsync -t leaves it
    assert book.stat().st_size == stat.st_size and book.stat().st_mtime_ns == stat.st_mtime_ns
    assert corpus_fingerprint(cfg) != before


def test_split_streams_bytes_and_documents(bundled_byte):
    dm = bundled_byte
    for split in SPLITS:
        tokens, docs = dm.split_tokens(split), dm.split_documents(split)
        assert tokens.dtype == np.uint16
        # byte tokenizer: one token per UTF-8 byte plus one EOS per document
        assert len(tokens) == dm.split_utf8_bytes(split) + len(docs)
        assert int((tokens == dm.tokenizer.eos_id).sum()) == len(docs)
        assert dm.tokenizer.decode(docs[0][:40]) == dm.tokenizer.decode(tokens[:40])
    entropy = dm.unigram_entropy()
    assert 2.0 < entropy < np.log(257)


# --- sampling -----------------------------------------------------------------------------


def test_packed_windows_shift_targets_by_one(bundled_byte):
    dm = bundled_byte
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == batch["targets"].shape == (4, 128)
    assert batch["input_ids"].dtype == torch.long
    torch.testing.assert_close(batch["input_ids"][:, 1:], batch["targets"][:, :-1])
    windows = PackedWindows(dm.split_tokens("validation"), 128)
    item = windows[3]
    expected = torch.from_numpy(
        dm.split_tokens("validation")[3 * 128 : 4 * 128 + 1].astype(np.int64)
    )
    torch.testing.assert_close(torch.cat([item["input_ids"], item["targets"][-1:]]), expected)


def test_eval_windows_are_fixed_and_capped(bundled_byte):
    dm = bundled_byte
    first_pass, second_pass = next(iter(dm.val_dataloader())), next(iter(dm.val_dataloader()))
    assert first_pass["input_ids"].equal(second_pass["input_ids"])
    torch.testing.assert_close(
        first_pass["input_ids"][0],
        torch.from_numpy(dm.split_tokens("validation")[:128].astype(np.int64)),
    )
    capped = PackedWindows(dm.split_tokens("validation"), 128, max_windows=10)
    assert (
        len(capped) == 10
        and capped.starts[-1] == (len(dm.split_tokens("validation")) - 1) // 128 - 1
    )


def test_ddp_ranks_get_disjoint_windows(bundled_byte):
    windows = PackedWindows(bundled_byte.split_tokens("train"), 128)
    # drop_last: without it the sampler pads an odd count by repeating one window
    per_rank = [
        set(
            DistributedSampler(
                windows, num_replicas=2, rank=r, shuffle=True, seed=3, drop_last=True
            )
        )
        for r in range(2)
    ]
    assert per_rank[0] and not per_rank[0] & per_rank[1]
    assert len(per_rank[0] | per_rank[1]) >= len(windows) - 1
    starts = [{int(windows.starts[i]) for i in indices} for indices in per_rank]
    assert not starts[0] & starts[1]


def ordered_batches(tokens, offsets, rank=0, world_size=1, num_workers=0, n=16, batch_size=3):
    stream = OrderedStream(tokens, offsets, n, batch_size, rank=rank, world_size=world_size)
    return list(DataLoader(stream, batch_size=None, num_workers=num_workers))


def test_ordered_stream_continues_rows_and_marks_document_starts():
    docs = [
        np.arange(1, 1 + length) for length in (47, 37, 120, 64, 90)
    ]  # 47 + EOS puts doc 2 on a chunk start
    eos = 999
    tokens = np.concatenate([np.append(d, eos) for d in docs]).astype(np.uint16)
    offsets = np.concatenate([[0], np.cumsum([len(d) + 1 for d in docs])])
    batches = ordered_batches(tokens, offsets)
    row_length = len(tokens) // 3
    assert len(batches) == (row_length - 1) // 16
    for t in range(len(batches) - 1):
        torch.testing.assert_close(batches[t + 1]["input_ids"][:, 0], batches[t]["targets"][:, -1])
    for r in range(3):
        row = torch.cat([b["input_ids"][r] for b in batches])
        torch.testing.assert_close(
            row,
            torch.from_numpy(tokens[r * row_length : r * row_length + len(row)].astype(np.int64)),
        )
        for t, b in enumerate(batches):
            first_token = r * row_length + t * 16
            assert bool(b["reset"][r]) == (t == 0 or first_token in set(offsets[:-1].tolist()))
    assert any(
        bool(b["reset"].any()) for b in batches[1:]
    )  # a document start lands on some chunk start
    # two loader workers reassemble the same order
    with_workers = ordered_batches(tokens, offsets, num_workers=2)
    assert all(
        a["input_ids"].equal(b["input_ids"]) and a["reset"].equal(b["reset"])
        for a, b in zip(batches, with_workers)
    )
    # two ranks own disjoint rows
    rank_rows = [
        ordered_batches(tokens, offsets, rank=k, world_size=2)[0]["input_ids"][:, 0].tolist()
        for k in range(2)
    ]
    assert rank_rows[0] != rank_rows[1]


def test_datamodule_ordered_mode_on_synthetic(tmp_path):
    dm = LongDocDataModule(
        small_synthetic(tmp_path),
        {"name": "byte"},
        context_length=64,
        batch_size=2,
        sampling="ordered",
    )
    train = iter(dm.train_dataloader())
    first, second = next(train), next(train)
    assert set(first) == {"input_ids", "targets", "reset"} and first["reset"].all()
    torch.testing.assert_close(second["input_ids"][:, 0], first["targets"][:, -1])
    assert dm.vocab_size == 257
    val = list(dm.val_dataloader())
    assert val and val[0]["input_ids"].shape == (2, 64)
