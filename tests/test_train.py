"""End to end on CPU: a short fit of `tiny`, checkpoint and resume, eval outputs, wandb offline."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose_config
from hydra.core.hydra_config import HydraConfig

from longctx.eval.outputs import RESULTS_SCHEMA_VERSION, ROW_FIELDS
from longctx.jobs import train
from longctx.train.module import LanguageModelTask


def run_config(out: Path, *overrides: str):
    cfg = compose_config(
        "model=tiny",
        "trainer=debug",
        "context_length=32",
        "batch_size=4",
        "eval.context_lengths=[16,32]",
        "eval.max_tokens=512",
        f"paths.root_dir={ROOT}",
        f"paths.output_dir={out}",
        f"data.cache_dir={out.parent / 'data_cache'}",
        *overrides,
    )
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fit") / "run"
    metrics = train(run_config(out))
    return out, metrics


def test_short_fit_writes_checkpoint_and_learns(trained_run):
    out, metrics = trained_run
    assert (out / "checkpoints" / "last.ckpt").exists()
    assert metrics["train/loss"] < torch.log(torch.tensor(257.0)).item()
    assert "val/loss" in metrics


def test_eval_outputs_follow_the_schema(trained_run):
    out, _ = trained_run
    results = json.loads((out / "results.json").read_text())
    assert results["schema_version"] == RESULTS_SCHEMA_VERSION
    assert results["attention"] == "full" and results["train_context_length"] == 32
    rows = {
        row["context_length"]: row for row in results["perplexity"] if row["protocol"] == "windows"
    }
    assert set(rows) == {16, 32}
    for length in (16, 32):
        row = rows[length]
        assert row["protocol"] == "windows" and row["skipped"] is None
        assert row["tokens"] > 0 and row["bytes"] > 0
        assert row["ppl"] == pytest.approx(torch.exp(torch.tensor(row["loss"])).item(), rel=1e-6)
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["attention", *ROW_FIELDS] and len(table) == len(results["perplexity"])
    assert (out / "ppl_vs_context.png").stat().st_size > 1000


def test_wandb_offline_run_directory_is_created(trained_run):
    out, _ = trained_run
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


def test_resume_continues_the_step_count(trained_run):
    out, _ = trained_run
    before = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert before == 4
    train(
        run_config(
            out, "ckpt_path=last", "trainer.max_steps=6", "eval_after_fit=false", "logger=csv"
        )
    )
    after = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert after["global_step"] == 6
    assert (
        LanguageModelTask.load_from_checkpoint(out / "checkpoints" / "last.ckpt").model.vocab_size
        == 257
    )
