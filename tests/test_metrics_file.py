"""The plain metrics file: written under any logger, continued on resume, read by the report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose_config
from hydra.core.hydra_config import HydraConfig

from longctx.core.metrics_log import METRICS_FILE, read_metrics
from longctx.eval.costs import costs_from_metrics_file, training_curve
from longctx.jobs import finish_wandb, train


def fit(out: Path, *overrides: str):
    cfg = compose_config(
        "model=tiny",
        "trainer=debug",
        "trainer.max_steps=6",
        "trainer.log_every_n_steps=2",
        "trainer.val_check_interval=3",
        "context_length=32",
        "batch_size=4",
        "eval_after_fit=false",
        f"paths.root_dir={ROOT}",
        f"paths.output_dir={out}",
        f"data.cache_dir={out.parent / 'data_cache'}",
        *overrides,
    )
    HydraConfig.instance().set_config(cfg)
    try:
        return train(cfg)
    finally:
        finish_wandb()  # a wandb run left open would be reused by the next test's logger


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("metrics") / "run"
    fit(out, "logger=wandb")
    return out


def test_the_metrics_file_is_written_under_the_wandb_logger(wandb_run):
    assert any((wandb_run / "wandb").glob("offline-run-*"))
    rows = read_metrics(wandb_run / METRICS_FILE)
    training = [r for r in rows if "loss" in r]
    validation = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in training] == [2, 4, 6]
    assert [r["step"] for r in validation] == [3, 6]
    for row in training:
        assert math.isfinite(row["loss"]) and row["grad_norm"] > 0 and row["lr"] > 0
        assert row["tokens"] == row["step"] * 4 * 32  # batch x context per optimizer step
        assert row["tokens_per_s"] > 0 and row["train_seconds"] > 0 and row["peak_rss_mib"] > 0
        assert row["flops"] > 0 and row["peak_memory_mib"] is None  # on the CPU
        assert row["threads"] == torch.get_num_threads() and row["load_average"] >= 0
    flops_per_token = training[0]["flops"] / training[0]["tokens"]
    assert training[-1]["flops"] == pytest.approx(flops_per_token * training[-1]["tokens"])
    seconds = [r["train_seconds"] for r in rows]
    assert seconds == sorted(seconds)
    assert validation[-1]["val_ppl"] == pytest.approx(math.exp(validation[-1]["val_loss"]))


def test_the_report_reads_costs_and_curves_from_the_metrics_file(wandb_run):
    cost = costs_from_metrics_file(wandb_run)
    rows = read_metrics(wandb_run / METRICS_FILE)
    last = [r for r in rows if "loss" in r][-1]
    assert cost["train_tokens"] == last["tokens"] == 6 * 128
    assert cost["tokens_per_s"] == pytest.approx(last["tokens"] / last["train_seconds"])
    assert cost["source"] == f"training log {METRICS_FILE}"
    curve = training_curve(wandb_run)
    assert [p["step"] for p in curve] == [3, 6]
    assert all(p["flops"] > 0 and p["val_loss"] > 0 for p in curve)


def test_a_resume_drops_rows_past_the_checkpoint_and_continues_the_counters(tmp_path):
    out = tmp_path / "run"
    fit(out, "logger=csv", "trainer.max_steps=4")
    at_checkpoint = next(r for r in read_metrics(out / METRICS_FILE) if r["step"] == 4)
    # Rows a run wrote after its last checkpoint before it died, the last one torn.
    with open(out / METRICS_FILE, "a") as handle:
        handle.write('{"step": 6, "tokens": 99999, "loss": 1.0}\n{"step": 8, "lo')
    fit(out, "logger=csv", "ckpt_path=last")
    rows = read_metrics(out / METRICS_FILE)
    assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6]
    resumed = next(r for r in rows if r["step"] == 6 and "loss" in r)
    assert resumed["tokens"] == at_checkpoint["tokens"] + 2 * 128
    assert resumed["train_seconds"] > at_checkpoint["train_seconds"]


@pytest.mark.parametrize(("load", "shared"), [(2.2, False), (3.0, True)])
def test_a_cpu_cost_measured_beside_other_work_is_marked_shared(tmp_path, load, shared):
    """2 threads keep the load average near 2 by themselves; 1 more busy process makes it 3."""
    rows = [
        {"step": s, "tokens": 100.0 * s, "train_seconds": 1.0 * s, "loss": 1.0,
         "peak_memory_mib": None, "load_average": load, "threads": 2}
        for s in (1, 2, 3)
    ]  # fmt: skip
    (tmp_path / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    cost = costs_from_metrics_file(tmp_path)
    assert cost["shared_cpu"] is shared
    assert cost["other_cpu_load"] == pytest.approx(load - 2)
