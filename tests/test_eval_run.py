"""eval.py on a real tiny checkpoint:
the numbers equal a plain forward, the schema and the plots."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose_config
from hydra.core.hydra_config import HydraConfig
from torch.nn import functional as F

from longctx.data import build_datamodule
from longctx.data.tokenizer import ByteTokenizer
from longctx.errors import ConfigError
from longctx.eval.outputs import RESULTS_SCHEMA_VERSION, SECTIONS
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
    "test_utf8_bytes",
    "checkpoint",
    "eval_settings",
    "eval_seconds",
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
    run_eval(cfg)
    import wandb

    wandb.finish()
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
    windows = [tokens[b : b + 33] for b in range(0, 256, 32)]  # max_tokens=256: the first 8 windows
    with torch.no_grad():
        nll = [
            F.cross_entropy(task.model(w[None, :-1])[0], w[1:], reduction="sum") for w in windows
        ]
    assert row["tokens"] == 256 and row["skipped"] is None
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
        assert results[section], section
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


def test_every_section_has_its_csv_and_the_plots_exist(evaluated):
    for section, (filename, fields) in SECTIONS.items():
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
