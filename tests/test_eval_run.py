"""eval.py on a real tiny checkpoint:
the numbers equal a plain forward, the schema and the plots."""

from __future__ import annotations

import csv
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, compose_config
from hydra.core.hydra_config import HydraConfig
from torch.nn import functional as F

from longctx.data import build_datamodule
from longctx.data.tokenizer import ByteTokenizer
from longctx.errors import ConfigError
from longctx.eval.compare import Arm, bootstrap_of, paired_facts, paired_loss
from longctx.eval.outputs import MQAR_SECTIONS, RESULTS_SCHEMA_VERSION, SECTIONS, UNITS_FILE
from longctx.eval.perplexity import window_plan
from longctx.eval.report import load_runs
from longctx.eval.run import run_eval
from longctx.jobs import train
from longctx.train.module import LanguageModelTask

EVAL_OVERRIDES = (
    "eval.context_lengths=[16,32,64]",
    "eval.max_tokens=256",
    "eval.batch_size=4",
    "eval.prefix_ablation.target_tokens=16",
    "eval.prefix_ablation.step=16",
    "eval.prefix_ablation.samples=3",
    "eval.passkey.lengths=[128]",
    "eval.passkey.depths=[0.0,1.0]",
    "eval.passkey.trials=1",
    "eval.passkey.distractors=2",
    "eval.fact_recall.max_docs=4",
    "eval.fact_recall.distractors=2",
    "eval.streaming.enabled=true",
    "eval.streaming.max_tokens=128",
)
META_KEYS = {
    "schema_version",
    "attention",
    "attention_options",
    "model",
    "parameters",
    "train_context_length",
    "train",
    "data",
    "tokenizer",
    "vocab_size",
    "split",
    "test_tokens",
    "test_documents",
    "test_utf8_bytes",
    "test_digest",
    "checkpoint",
    "eval_settings",
    "eval_seconds",
    "eval_forward_tokens",
    "started_at",
    "finished_at",
    "code_version",
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny model trained for 4 steps on the synthetic corpus (planted facts)."""
    out = tmp_path_factory.mktemp("fit") / "run"
    cfg = compose_config(
        "model=tiny",
        "trainer=debug",
        "context_length=32",
        "batch_size=4",
        "data=synthetic",
        "data.num_docs=120",
        "eval_after_fit=false",
        "logger=csv",
        f"paths.root_dir={ROOT}",
        f"paths.output_dir={out}",
        f"data.cache_dir={out.parent / 'cache'}",
    )
    HydraConfig.instance().set_config(cfg)
    train(cfg)
    return out / "checkpoints" / "last.ckpt"


def eval_config(out: Path, *overrides: str):
    cfg = compose_config(
        f"paths.root_dir={ROOT}", f"paths.output_dir={out}", *overrides, config_name="eval"
    )
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.fixture(scope="module")
def evaluated(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "run"
    # paths.data_dir: eval finds the training run's token cache under <data_dir>/cache.
    cfg = eval_config(
        out, f"ckpt_path={checkpoint}", f"paths.data_dir={checkpoint.parents[2]}", *EVAL_OVERRIDES
    )
    logger = logging.getLogger("longctx.eval")
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.INFO
    try:
        run_eval(cfg)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    import wandb

    wandb.finish()
    (out / "log_lines.txt").write_text("\n".join(lines))
    return out


def test_perplexity_equals_a_plain_forward_of_the_checkpoint(checkpoint, evaluated):
    results = json.loads((evaluated / "results.json").read_text())
    row = next(
        r for r in results["perplexity"] if r["context_length"] == 32 and r["protocol"] == "windows"
    )
    task = LanguageModelTask.load_from_checkpoint(checkpoint, map_location="cpu")
    data_cfg = compose_config(
        "data=synthetic",
        "data.num_docs=120",
        "context_length=32",
        "batch_size=4",
        f"data.cache_dir={checkpoint.parents[2] / 'cache'}",
    )
    datamodule = build_datamodule(data_cfg, ordered_stream=False)
    tokens = torch.as_tensor(datamodule.split_tokens("test").astype("int64"))
    # max_tokens=256: 8 windows evenly spaced over the split's 1 + (n - 33) // 32 candidates
    candidates = range(0, len(tokens) - 32, 32)
    begins = [candidates[i] for i in np.linspace(0, len(candidates) - 1, 8).round().astype(int)]
    assert [b for b, _ in window_plan(len(tokens), 32, 32, 256)] == begins
    windows = [tokens[b : b + 33] for b in begins]
    with torch.no_grad():
        nll = [
            F.cross_entropy(task.model(w[None, :-1])[0], w[1:], reduction="sum") for w in windows
        ]
    assert row["tokens"] == 256 and row["skipped"] is None and row["windows"] == 8
    assert row["split_share"] == pytest.approx(256 / (len(tokens) - 1))
    assert row["loss"] == pytest.approx(torch.stack(nll).sum().item() / 256, rel=1e-6)
    assert row["bytes"] == sum(int((w[1:] != ByteTokenizer.eos_id).sum()) for w in windows)


def test_results_json_follows_the_documented_schema(evaluated):
    results = json.loads((evaluated / "results.json").read_text())
    assert set(results) == META_KEYS | set(SECTIONS)
    assert results["schema_version"] == RESULTS_SCHEMA_VERSION
    assert (
        results["attention"] == "full"
        and results["train_context_length"] == 32
        and results["data"] == "synthetic"
    )
    for section, (_, fields) in SECTIONS.items():
        assert bool(results[section]) != (section in MQAR_SECTIONS), section
        assert all(list(row) == list(fields) for row in results[section]), section
    protocols = {(r["context_length"], r["protocol"]) for r in results["perplexity"]}
    assert protocols == {
        (16, "windows"),
        (16, "sliding"),
        (32, "windows"),
        (32, "sliding"),
        (64, "windows"),
        (64, "sliding"),
        (32, "streaming"),
    }
    assert {r["context_length"] for r in results["position_loss"]} == {16, 32, 64}
    assert [r["prefix_length"] for r in results["prefix_ablation"]] == [0, 16, 32, 48]
    assert {(r["context_length"], r["depth"]) for r in results["passkey"]} == {
        (128, 0.0),
        (128, 1.0),
    }
    assert {r["context_length"] for r in results["fact_recall"]} == {32}
    assert all(
        r["skipped"] is None
        for s in ("perplexity", "prefix_ablation", "passkey")
        for r in results[s]
    )


def test_every_figure_carries_its_interval_and_the_split_share(evaluated):
    results = json.loads((evaluated / "results.json").read_text())
    assert results["test_documents"] > 1 and len(results["test_digest"]) == 16
    for row in results["perplexity"]:
        assert row["documents"] > 1 and 0 < row["split_share"] <= 1, row
        for key in ("loss", "ppl", "bpb"):
            assert row[f"{key}_low"] < row[key] < row[f"{key}_high"], (key, row)
    for row in results["position_loss"]:
        assert row["loss_low"] <= row["loss"] <= row["loss_high"]
        assert row["few_tokens"] == (row["tokens"] < 256)
    for section, key in (("prefix_ablation", "loss"), ("passkey", "accuracy")):
        for row in results[section]:
            assert row[f"{key}_low"] <= row[key] <= row[f"{key}_high"], (section, row)
    for row in results["fact_recall"]:
        assert row["accuracy_low"] <= row["accuracy"] <= row["accuracy_high"]
        if row["docs"] >= 2:  # one fact gives no spread to estimate
            assert row["answer_nll_low"] <= row["answer_nll"] <= row["answer_nll_high"]
        else:
            assert row["answer_nll_low"] is None
    assert set(results["eval_forward_tokens"]) == set(results["eval_seconds"])
    assert all(count > 0 for count in results["eval_forward_tokens"].values())
    units = json.loads((evaluated / UNITS_FILE).read_text())
    assert units["test_digest"] == results["test_digest"]
    scored = [r for r in results["perplexity"] if r["skipped"] is None]
    assert len(units["perplexity"]) == len(scored)
    for unit, row in zip(units["perplexity"], scored):
        assert sum(unit["tokens"]) == row["tokens"] and len(unit["documents"]) == row["documents"]


def test_evaluation_says_what_it_is_doing(evaluated):
    lines = (evaluated / "log_lines.txt").read_text().splitlines()
    starts = [line for line in lines if line.startswith("eval ") and ": " in line]
    names = ["perplexity", "streaming", "prefix_ablation", "passkey", "fact_recall"]
    for number, name in enumerate(names, 1):
        assert any(line.startswith(f"eval {number}/5 {name}: ") for line in starts), name
        assert any(line.startswith(f"eval {number}/5 {name} done in ") for line in lines), name
    assert any("evaluation results: " in line for line in lines)


def test_every_section_has_its_csv_and_the_plots_exist(evaluated):
    for section, (filename, fields) in SECTIONS.items():
        if section in MQAR_SECTIONS:  # a corpus run writes none of data=mqar's tables
            assert not (evaluated / filename).exists()
            continue
        with open(evaluated / filename) as handle:
            table = list(csv.reader(handle))
        assert table[0] == ["attention", *fields]
        assert len(table) - 1 == len(json.loads((evaluated / "results.json").read_text())[section])
    for png in (
        "ppl_vs_context",
        "loss_vs_position",
        "prefix_ablation",
        "passkey_heatmap",
        "fact_recall",
    ):
        assert (evaluated / f"{png}.png").stat().st_size > 5000, png


def test_tables_and_plots_go_to_wandb(evaluated):
    (run,) = (evaluated / "wandb").glob("offline-run-*")
    logged = {p.name.rsplit("_", 2)[0] for p in run.rglob("*.json") if "media" in p.parts}
    assert {"perplexity", "position_loss", "prefix_ablation", "passkey", "fact_recall"} <= logged
    assert len(list(run.rglob("media/images/eval/figures/*.png"))) == 5


def test_two_evaluations_of_one_checkpoint_differ_by_zero_with_zero_width(
    checkpoint, evaluated, tmp_path
):
    again = tmp_path / "again"
    run_eval(
        eval_config(
            again,
            f"ckpt_path={checkpoint}",
            f"paths.data_dir={checkpoint.parents[2]}",
            "~logger",
            *EVAL_OVERRIDES,
        )
    )
    runs, _ = load_runs([str(evaluated), str(again)])
    first, second = (Arm(run.label, [run]) for run in runs)
    bootstrap = bootstrap_of(runs)
    for length in (16, 32, 64):
        difference = paired_loss(first, second, length, "windows", bootstrap)
        assert (difference.value, difference.low, difference.high) == (0.0, 0.0, 0.0)
        assert difference.units > 1  # documents
    # At 32 tokens no planted fact (64+ characters back) lies inside the context.
    assert paired_facts(first, second, 32, bootstrap).why == "no fact inside the context"


def test_eval_without_a_checkpoint_or_runs_says_what_to_set(tmp_path):
    with pytest.raises(ConfigError, match="ckpt_path=.*report.runs"):
        run_eval(eval_config(tmp_path, "~logger"))


def test_a_bad_eval_setting_fails_before_the_checkpoint_loads(tmp_path):
    with pytest.raises(ConfigError, match="eval.passkey.depths"):
        run_eval(
            eval_config(
                tmp_path, "ckpt_path=/does/not/exist.ckpt", "eval.passkey.depths=[3.0]", "~logger"
            )
        )


@pytest.mark.slow
def test_multirun_over_checkpoints_writes_one_directory_each(checkpoint, tmp_path):
    command = [
        sys.executable,
        "eval.py",
        "-m",
        f"ckpt_path={checkpoint},{checkpoint}",
        "~logger",
        f"paths.data_dir={checkpoint.parents[2]}",
        f"hydra.sweep.dir={tmp_path}",
        *EVAL_OVERRIDES,
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    results = sorted(tmp_path.glob("*/results.json"))
    assert len(results) == 2 and results[0].parent != results[1].parent
