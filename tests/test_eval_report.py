"""Report mode on small fake run directories, and the comparison experiments' configs."""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import pytest
from conftest import ROOT, compose_config
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from longctx.attention import available_backends, build_backend
from longctx.eval.costs import costs_from_bench
from longctx.eval.outputs import RESULTS_SCHEMA_VERSION
from longctx.eval.report import find_run_dirs, load_runs, write_report
from longctx.eval.run import run_eval
from longctx.jobs import finish_wandb
from longctx.model import model_dims


def fake_results(attention: str, data: str = "synthetic", quality: float = 1.0, **options) -> dict:
    """A results.json as evaluate_model writes it; lower `quality` = lower losses."""
    lengths = [128, 256, 512]
    return {
        "schema_version": RESULTS_SCHEMA_VERSION,
        "attention": attention,
        "attention_options": {"name": attention, **options},
        "model": {"n_layer": 2, "d_model": 64},
        "parameters": 120_000,
        "train_context_length": 256,
        "train": {"max_steps": 10, "batch_size": 4, "seed": 1},
        "data": data,
        "tokenizer": "byte",
        "vocab_size": 257,
        "split": "test",
        "checkpoint": None,
        "eval_settings": {"passkey": {"distractors": 4}, "fact_recall": {"distractors": 4}},
        "started_at": "2026-01-01T10:00:00+00:00",
        "finished_at": "2026-01-01T10:30:00+00:00",
        "code_version": "abc",
        "perplexity": [
            {
                "context_length": n,
                "stride": s,
                "protocol": p,
                "tokens": 100,
                "bytes": 100,
                "loss": quality * (2 + n / 1000),
                "ppl": 2.718 ** (quality * (2 + n / 1000)),
                "bpb": quality,
                "seconds": 1.0,
                "peak_memory_mib": None,
                "skipped": None,
            }
            for n in lengths
            for s, p in ((n, "windows"), (n // 2, "sliding"))
        ],
        "position_loss": [
            {
                "context_length": 256,
                "position_start": a,
                "position_end": b,
                "tokens": 10,
                "loss": quality * 3 / (1 + a),
            }
            for a, b in ((0, 1), (1, 2), (2, 4), (4, 256))
        ],
        "prefix_ablation": [
            {
                "prefix_length": p,
                "target_tokens": 128,
                "samples": 4,
                "tokens": 512,
                "loss": quality * (2 - p / 1000),
                "ppl": None,
                "skipped": None,
            }
            for p in (0, 128, 384)
        ],
        "passkey": [
            {
                "context_length": n,
                "depth": d,
                "trials": 4,
                "correct": 2,
                "accuracy": 0.5 / quality,
                "mean_rank": 1.5,
                "skipped": None,
            }
            for n in (256, 512)
            for d in (0.0, 1.0)
        ],
        "fact_recall": [
            {
                "context_length": 256,
                "distance": d,
                "docs": 4,
                "fact_in_context": 4 if d < 256 else 0,
                "correct": 4 if quality < 1 and d < 256 else 1,
                "accuracy": (4 if quality < 1 and d < 256 else 1) / 4,
                "answer_nll": 1.0,
                "skipped": None,
            }
            for d in (64, 1024)
            if data == "synthetic"
        ],
    }


def make_run(
    directory: Path, results: dict, tokens: float | None = None, seconds: float | None = None
) -> Path:
    (directory / ".hydra").mkdir(parents=True)
    (directory / ".hydra" / "config.yaml").write_text("{}\n")
    (directory / "results.json").write_text(json.dumps(results))
    if tokens is not None:
        (directory / "csv").mkdir()
        rows = [
            ["step", "train/lengths", "train/time", "train/loss"],
            [9, tokens / 2, seconds / 2, 3.0],
            [19, tokens, seconds, 2.5],
            [19, "", "", 2.4],
        ]
        with open(directory / "csv" / "metrics.csv", "w", newline="") as handle:
            csv.writer(handle).writerows(rows)
    return directory


@pytest.fixture
def sweep(tmp_path) -> Path:
    """A multirun directory: full and sliding_window on synthetic, full on bundled,
    one failed job."""
    root = tmp_path / "multirun"
    make_run(root / "0_full", fake_results("full", quality=0.8), tokens=40_000, seconds=20.0)
    make_run(
        root / "1_sliding_window",
        fake_results("sliding_window", window=64),
        tokens=60_000,
        seconds=20.0,
    )
    make_run(root / "2_full", fake_results("full", data="bundled"))
    (root / "3_rwkv" / ".hydra").mkdir(parents=True)  # a job that failed before writing results
    OmegaConf.save(
        {"hydra": {"overrides": {"task": ["experiment=compare_cpu", "++attention={name:full}"]}}},
        root / "multirun.yaml",
    )
    old = time.time() - 3600
    os.utime(root / "0_full" / ".hydra" / "config.yaml", (old, old))
    return root


def write_bench(path: Path) -> Path:
    rows = [
        {
            "subject": "full",
            "kind": "backend",
            "mode": "fwd_bwd",
            "dtype": "bf16",
            "seq_len": 1024,
            "status": "ok",
            "tokens_per_s": 900.0,
            "memory_mib": 50.0,
        },
        {
            "subject": "full",
            "kind": "backend",
            "mode": "fwd_bwd",
            "dtype": "bf16",
            "seq_len": 4096,
            "status": "ok",
            "tokens_per_s": 300.0,
            "memory_mib": 200.0,
        },
        {
            "subject": "full",
            "kind": "backend",
            "mode": "train_step",
            "dtype": "bf16",
            "seq_len": 4096,
            "status": "ok",
            "tokens_per_s": 111.0,
            "memory_mib": 999.0,
        },
        {
            "subject": "full",
            "kind": "backend",
            "mode": "fwd_bwd",
            "dtype": "fp32",
            "seq_len": 256,
            "status": "ok",
            "tokens_per_s": 5.0,
            "memory_mib": 5.0,
        },
    ]
    path.write_text(json.dumps({"rows": rows}))
    return path


def test_report_overlays_runs_per_corpus_with_their_costs(sweep, tmp_path):
    out = tmp_path / "report"
    report = write_report(OmegaConf.create({"runs": str(sweep), "output_dir": str(out)}), tmp_path)
    assert [m.name for m in report["missing"]] == ["3_rwkv"]
    text = (out / "report.md").read_text()
    assert "## bundled (byte tokenizer, trained at 256 tokens)" in text and "## synthetic" in text
    synthetic = text[text.index("## synthetic") :]
    assert "| full | 0.12M | 6.08 |" in synthetic  # exp(0.8 * (2 + 0.256))
    assert "| sliding_window | 0.12M | 9.54 |" in synthetic
    assert (
        "`3_rwkv`" in text and "wall time from the first run's start to the last evaluation" in text
    )
    assert (
        "produced by: `python train.py -m experiment=compare_cpu '++attention={name:full}'`" in text
    )
    assert "| full | 1.00 (4/4 in context) | 0.25 (0/4 in context) |" in synthetic
    # The numbers behind the loss-by-position plot: 0.8 * 3 / (1 + position_start).
    assert "| mechanism | [0, 1) | [1, 2) | [2, 4) | [4, 256) |" in synthetic
    assert (
        "| full | 2.4 | 1.2 | 0.8 | 0.48 |" in synthetic
        and "| sliding_window | 3 | 1.5 | 1 | 0.6 |" in synthetic
    )
    with open(out / "report.csv") as handle:
        rows = {(r["mechanism"], r["data"]): r for r in csv.DictReader(handle)}
    assert float(rows[("full", "synthetic")]["tokens_per_s"]) == pytest.approx(2000.0)
    assert float(rows[("sliding_window", "synthetic")]["tokens_per_s"]) == pytest.approx(3000.0)
    assert rows[("full", "bundled")]["tokens_per_s"] == ""
    assert float(rows[("full", "synthetic")]["prefix_gain"]) == pytest.approx(0.8 * 0.384)
    for name in (
        "ppl_vs_context",
        "loss_vs_position",
        "prefix_ablation",
        "passkey",
        "fact_recall",
        "cost_vs_quality",
    ):
        assert (out / f"{name}_synthetic-byte-ctx256.png").stat().st_size > 5000, name
        assert f"({name}_synthetic-byte-ctx256.png)" in text
    assert not (out / "fact_recall_bundled-byte-ctx256.png").exists()


def test_runs_are_found_by_glob_list_or_multirun_root(sweep):
    by_root, missing = find_run_dirs(str(sweep))
    by_glob, _ = find_run_dirs(str(sweep / "*"))
    by_list, _ = find_run_dirs([str(sweep / "0_full"), str(sweep / "1_*"), str(sweep / "2_full")])
    assert by_root == by_glob == by_list and len(by_root) == 3
    assert [m.name for m in missing] == ["3_rwkv"]


def test_costs_fall_back_to_the_bench_at_the_nearest_length(sweep, tmp_path):
    bench = write_bench(tmp_path / "bench.json")
    runs, _ = load_runs(str(sweep), bench=str(bench))
    bundled = next(r for r in runs if r.results["data"] == "bundled")
    assert (
        bundled.cost["tokens_per_s"] == 111.0 and bundled.cost["peak_memory_mib"] == 999.0
    )  # train_step first
    assert bundled.cost["sources"]["tokens_per_s"] == "bench train_step bf16 N=4096"
    logged = next(r for r in runs if r.label == "full" and r.results["data"] == "synthetic")
    assert logged.cost["tokens_per_s"] == pytest.approx(2000.0)
    assert logged.cost["sources"] == {
        "tokens_per_s": "training log csv/metrics.csv",
        "peak_memory_mib": "bench train_step bf16 N=4096",
    }
    rows = json.loads(bench.read_text())["rows"]
    assert (
        costs_from_bench([r for r in rows if r["mode"] == "fwd_bwd"], "full", 256, "bf16")[
            "tokens_per_s"
        ]
        == 900.0
    )
    assert costs_from_bench(rows, "rwkv", 256, "bf16") == {}


def test_runs_of_one_mechanism_are_told_apart_by_their_settings(tmp_path):
    make_run(tmp_path / "a", fake_results("sliding_window", window=64))
    make_run(tmp_path / "b", fake_results("sliding_window", window=128))
    runs, _ = load_runs(str(tmp_path / "*"))
    assert sorted(r.label for r in runs) == [
        "sliding_window (window=128)",
        "sliding_window (window=64)",
    ]


def test_report_mode_through_eval_py_logs_to_wandb_offline_by_default(sweep, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # a user who never configured wandb
    out = tmp_path / "eval_run"
    cfg = compose_config(
        f"paths.root_dir={ROOT}",
        f"paths.output_dir={out}",
        f"report.runs=[{sweep / '0_full'},{sweep / '1_sliding_window'}]",
        config_name="eval",
    )
    HydraConfig.instance().set_config(cfg)
    try:
        report = run_eval(cfg)
    finally:
        finish_wandb()
    assert len(report["runs"]) == 2
    assert "- report: `python eval.py paths.root_dir=" in (out / "report.md").read_text()
    (run,) = (out / "wandb").glob("offline-run-*")
    assert any(run.rglob("media/table/report/*.table.json"))


def sweep_values(cfg, key: str) -> list:
    return list(
        OverridesParser.create()
        .parse_override(f"{key}={cfg.hydra.sweeper.params[key]}")
        .sweep_iterator()
    )


@pytest.mark.parametrize("experiment", ["compare_cpu", "compare_gpu"])
def test_every_compared_backend_config_is_valid(experiment):
    """Each sweep value builds its backend under the experiment's model
    (backends still landing are skipped)."""
    cfg = compose_config(f"experiment={experiment}")
    assert cfg.hydra.mode.name == "MULTIRUN"
    attention = sweep_values(cfg, "++attention")
    names = [a["name"] for a in attention]
    assert names[0] == "full" and len(set(map(json.dumps, attention))) == len(attention)
    OmegaConf.set_struct(
        cfg, False
    )  # `++attention=` adds the backend's keys, as Hydra does for each job
    for options in attention:
        if options["name"] not in available_backends():
            continue
        merged = OmegaConf.merge(cfg, {"attention": options})
        backend = build_backend(merged.attention, model_dims(merged))
        backend.check_sequence_length(merged.context_length)
    if "data" in cfg.hydra.sweeper.params:
        for data in sweep_values(cfg, "data"):
            compose_config(f"experiment={experiment}", f"data={data}")


def test_cpu_sliding_window_cannot_reach_the_planted_distance_through_all_layers():
    cfg = compose_config("experiment=compare_cpu")
    window = next(
        a["window"] for a in sweep_values(cfg, "++attention") if a["name"] == "sliding_window"
    )
    reach = cfg.model.n_layer * (window - 1)
    planted = sorted(OmegaConf.load(ROOT / "conf" / "data" / "synthetic.yaml").distances)
    assert any(reach < d <= cfg.context_length for d in planted)
