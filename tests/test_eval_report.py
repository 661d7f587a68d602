"""Report mode on small fake run directories, and the comparison experiments' configs."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import pytest
from conftest import ROOT, compose_config
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from longctx.attention import available_backends, build_backend
from longctx.core.metrics_log import METRICS_FILE
from longctx.eval.costs import costs_from_bench
from longctx.eval.outputs import RESULTS_SCHEMA_VERSION, UNITS_FILE
from longctx.eval.report import find_run_dirs, load_runs, write_report
from longctx.eval.run import run_eval
from longctx.jobs import finish_wandb
from longctx.model import model_dims

DOCUMENT_DIFFICULTY = [0.9, 1.0, 1.1, 1.2]  # four test documents, each 100 scored tokens


def fake_results(
    attention: str, data: str = "synthetic", quality: float = 1.0, seed: int = 1, **options
) -> tuple[dict, dict]:
    """A results.json and units.json as evaluate_model writes them; lower `quality` = lower
    losses. Each length's loss is the token-weighted mean of its documents' losses."""
    lengths = [128, 256, 512]
    model = options.pop("model", {"n_layer": 2, "d_model": 64})
    perplexity, units = [], []
    for n in lengths:
        for s, p in ((n, "windows"), (n // 2, "sliding")):
            nll = [quality * (2 + n / 1000) * d * 100 for d in DOCUMENT_DIFFICULTY]
            loss = sum(nll) / 400
            perplexity.append(
                {
                    "context_length": n,
                    "stride": s,
                    "protocol": p,
                    "tokens": 400,
                    "bytes": 400,
                    "loss": loss,
                    "loss_low": loss - 0.1,
                    "loss_high": loss + 0.1,
                    "ppl": math.exp(loss),
                    "ppl_low": math.exp(loss - 0.1),
                    "ppl_high": math.exp(loss + 0.1),
                    "bpb": quality,
                    "bpb_low": quality - 0.05,
                    "bpb_high": quality + 0.05,
                    "windows": 4,
                    "documents": 4,
                    "split_share": 0.5,
                    "plan_digest": f"plan-{n}-{s}",
                    "seconds": 1.0,
                    "peak_memory_mib": None,
                    "skipped": None,
                }
            )
            units.append(
                {
                    "context_length": n,
                    "stride": s,
                    "protocol": p,
                    "plan_digest": f"plan-{n}-{s}",
                    "documents": [0, 1, 2, 3],
                    "nll": nll,
                    "tokens": [100] * 4,
                    "bytes": [100] * 4,
                }
            )
    facts = {"context_length": 256, "documents": list(range(8)), "in_context": [1] * 4 + [0] * 4}
    facts["correct"] = [1, 1, 1, 1 if quality < 1 else 0] + [0] * 4
    facts["answer_nll"] = [1.0] * 8
    results = {
        "schema_version": RESULTS_SCHEMA_VERSION,
        "attention": attention,
        "attention_options": {"name": attention, **options},
        "model": model,
        "parameters": 120_000,
        "train_context_length": 256,
        "train": {"max_steps": 10, "batch_size": 4, "seed": seed},
        "data": data,
        "tokenizer": "byte",
        "vocab_size": 257,
        "split": "test",
        "test_digest": f"split-{data}",
        "checkpoint": None,
        "eval_settings": {
            "passkey": {"distractors": 4},
            "fact_recall": {"distractors": 4},
            "bootstrap": {"resamples": 200, "confidence": 0.95, "seed": 0},
            "min_bin_tokens": 16,
        },
        "eval_seconds": {"perplexity": 30.0},
        "started_at": "2026-01-01T10:00:00+00:00",
        "finished_at": "2026-01-01T10:30:00+00:00",
        "code_version": "abc",
        "perplexity": perplexity,
        "position_loss": [
            {
                "context_length": 256,
                "position_start": a,
                "position_end": b,
                "tokens": b - a,
                "documents": 4,
                "loss": quality * 3 / (1 + a),
                "loss_low": quality * 3 / (1 + a) - 0.1,
                "loss_high": quality * 3 / (1 + a) + 0.1,
                "few_tokens": b - a < 16,
            }
            for a, b in ((0, 1), (1, 2), (2, 4), (4, 256))
        ],
        "prefix_ablation": [
            {
                "prefix_length": p,
                "target_tokens": 128,
                "samples": 4,
                "tokens": 512,
                "documents": 4,
                "loss": quality * (2 - p / 1000),
                "loss_low": quality * (2 - p / 1000) - 0.1,
                "loss_high": quality * (2 - p / 1000) + 0.1,
                "ppl": None,
                "gain": quality * p / 1000,
                "gain_low": quality * p / 1000 - 0.01,
                "gain_high": quality * p / 1000 + 0.01,
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
                "accuracy": 0.5,
                "accuracy_low": 0.15,
                "accuracy_high": 0.85,
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
                "correct": sum(facts["correct"][:4]) if d < 256 else 0,
                "accuracy": sum(facts["correct"][:4]) / 4 if d < 256 else 0.0,
                "accuracy_low": 0.1 if d < 256 else 0.0,
                "accuracy_high": 1.0 if d < 256 else 0.49,
                "answer_nll": 1.0,
                "answer_nll_low": 1.0,
                "answer_nll_high": 1.0,
                "skipped": None,
            }
            for d in (64, 1024)
            if data == "synthetic"
        ],
    }
    unit_file = {"test_digest": f"split-{data}", "perplexity": units}
    if data == "synthetic":
        unit_file["fact_recall"] = [facts]
    return results, unit_file


def make_run(
    directory: Path,
    results: tuple[dict, dict],
    tokens: float | None = None,
    seconds: float | None = None,
    curve: list[tuple[int, float, float, float]] | None = None,
) -> Path:
    """A run directory; `tokens`/`seconds`: a CSV logger's cumulative throughput; `curve`:
    metrics.jsonl validation points (step, flops, train seconds, val loss)."""
    (directory / ".hydra").mkdir(parents=True)
    (directory / ".hydra" / "config.yaml").write_text("{}\n")
    (directory / "results.json").write_text(json.dumps(results[0]))
    (directory / UNITS_FILE).write_text(json.dumps(results[1]))
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
    if curve is not None:
        lines = []
        for step, flops, train_seconds, val_loss in curve:
            lines.append(
                {
                    "step": step,
                    "tokens": step * 100,
                    "flops": flops,
                    "train_seconds": train_seconds,
                    "loss": val_loss + 0.1,
                    "tokens_per_s": 100 / train_seconds * step,
                }
            )
            lines.append(
                {
                    "step": step,
                    "tokens": step * 100,
                    "flops": flops,
                    "train_seconds": train_seconds,
                    "val_loss": val_loss,
                }
            )
        (directory / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in lines))
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


def test_report_overlays_runs_per_corpus_with_their_costs(sweep, tmp_path, capsys):
    out = tmp_path / "report"
    report = write_report(OmegaConf.create({"runs": str(sweep), "output_dir": str(out)}), tmp_path)
    assert capsys.readouterr().out.strip() == f"report: {out / 'report.md'}"
    assert [m.name for m in report["missing"]] == ["3_rwkv"]
    text = (out / "report.md").read_text()
    assert "## bundled (byte tokenizer, trained at 256 tokens)" in text and "## synthetic" in text
    synthetic = text[text.index("## synthetic") :]
    full_loss = 0.8 * 2.256 * 1.05  # the documents' mean difficulty is 1.05
    low, high = (f"{math.exp(full_loss + d):.3g}" for d in (-0.1, 0.1))
    assert f"| full | 1 | 0.12M | {math.exp(full_loss):.3g} [{low}, {high}] |" in synthetic
    assert "| sliding_window | 1 | 0.12M |" in synthetic
    assert "`3_rwkv`" in text and "time summed over runs" in text
    assert (
        "produced by: `python train.py -m experiment=compare_cpu '++attention={name:full}'`" in text
    )
    assert (
        "| full | 4/4 [0.10, 1.00] (4 in context) | 0/4 [0.00, 0.49] (0 in context) |" in synthetic
    )
    # The numbers behind the loss-by-position plot: 0.8 * 3 / (1 + position_start); * = few tokens.
    assert "| mechanism | [0, 1) | [1, 2) | [2, 4) | [4, 256) |" in synthetic
    assert "| full | 2.4* | 1.2* | 0.8* | 0.48 |" in synthetic
    # ppl @512 is the longest length, shown once (the training length is 256 here).
    assert synthetic.count("ppl @512") == 1 and synthetic.count("ppl @256 |") == 1
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
        "paired_differences",
    ):
        assert (out / f"{name}_synthetic-byte-ctx256.png").stat().st_size > 5000, name
        assert f"({name}_synthetic-byte-ctx256.png)" in text
    assert not (out / "fact_recall_bundled-byte-ctx256.png").exists()


def interval_cell(text: str) -> tuple[float, float, float]:
    """'+0.47 [+0.39, +0.56]' -> (0.47, 0.39, 0.56)."""
    value, low, high = re.fullmatch(r"(\S+) \[(\S+), (\S+)\]", text).groups()
    return float(value), float(low), float(high)


def test_report_gives_paired_differences_against_the_baseline(sweep, tmp_path):
    out = tmp_path / "report"
    write_report(OmegaConf.create({"runs": str(sweep), "output_dir": str(out)}), tmp_path)
    synthetic = (out / "report.md").read_text().split("## synthetic")[1]
    assert "Paired differences against **full**" in synthetic
    # sliding_window's loss on each document is 1.25 times full's: Δloss = 0.2 * 2.256 * 1.05.
    row = next(line for line in synthetic.splitlines() if line.startswith("| sliding_window | +"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    value, low, high = interval_cell(cells[1])
    assert value == pytest.approx(0.2 * 2.256 * 1.05, abs=0.005) and 0 < low < value < high
    assert cells[-1] == "higher loss than full (no seeds: noise between runs not measured)"
    assert "No arm has two seeds" in synthetic


def test_identical_checkpoints_differ_by_zero_with_a_zero_width_interval(tmp_path):
    make_run(tmp_path / "a", fake_results("full"))
    make_run(tmp_path / "b", fake_results("full", model={"n_layer": 2, "d_model": 64, "tag": 1}))
    report = write_report(
        OmegaConf.create({"runs": str(tmp_path / "*"), "output_dir": str(tmp_path / "r")}), tmp_path
    )
    text = (tmp_path / "r" / "report.md").read_text()
    assert len(report["runs"]) == 2
    row = next(line for line in text.splitlines() if line.startswith("| full (model.tag=1) | 0"))
    assert row.startswith("| full (model.tag=1) | 0 [0, 0] | 0 [0, 0] | 0 [0, 0] |")
    assert "not distinguishable from full (the interval holds 0)" in row


def test_seeds_of_one_arm_are_pooled_and_give_the_noise_floor(tmp_path):
    make_run(tmp_path / "a", fake_results("full", seed=1))
    make_run(tmp_path / "b", fake_results("full", quality=1.01, seed=2))
    make_run(tmp_path / "c", fake_results("sliding_window", quality=1.2, window=64))
    make_run(tmp_path / "d", fake_results("linear", quality=1.012))
    write_report(
        OmegaConf.create({"runs": str(tmp_path / "*"), "output_dir": str(tmp_path / "r")}), tmp_path
    )
    text = (tmp_path / "r" / "report.md").read_text()
    seeds_row = next(line for line in text.splitlines() if line.startswith("| full | 1, 2 |"))
    losses = [2.256 * 1.05 * q for q in (1.0, 1.01)]
    assert f"(seeds {math.exp(losses[0]):.3g}, {math.exp(losses[1]):.3g})" in seeds_row
    floor = losses[1] - losses[0]
    assert "| full | 1 vs 2 |" in text and f"no larger than {floor:.3g} nats" in text
    linear = next(line for line in text.splitlines() if line.startswith("| linear | +"))
    assert "within the seed noise floor" in linear  # distinguishable from 0, not from seed noise
    window = next(line for line in text.splitlines() if line.startswith("| sliding_window | +"))
    assert window.endswith("higher loss than full |")


def test_report_puts_runs_at_equal_compute(tmp_path):
    make_run(
        tmp_path / "a", fake_results("full"), curve=[(50, 1e12, 10, 3.0), (100, 2e12, 20, 2.5)]
    )
    make_run(
        tmp_path / "b",
        fake_results("linear", quality=1.1),
        curve=[(50, 0.5e12, 5, 3.2), (100, 1e12, 10, 2.9)],
    )
    write_report(
        OmegaConf.create({"runs": str(tmp_path / "*"), "output_dir": str(tmp_path / "r")}), tmp_path
    )
    text = (tmp_path / "r" / "report.md").read_text()
    assert "val loss @ step 100 | val loss @ 1e+12 FLOPs | val loss @ 10 s |" in text
    # full at 1e12 FLOPs and 10 s is its step-50 point; linear's budget is its last point.
    assert "| full | 100 | 2e+12 | 20 | 2.5 | 2.5 | 3 | 3 |" in text
    assert "| linear | 100 | 1e+12 | 10 | 2.9 | 2.9 | 2.9 | 2.9 |" in text
    assert (tmp_path / "r" / "training_curves_synthetic-byte-ctx256.png").stat().st_size > 5000


def test_throughput_measured_beside_other_work_is_marked_shared(tmp_path):
    """A CPU run whose metrics.jsonl logs a load average 1 above its own threads: its tok/s gets
    `*` in report.md and shared_cpu in report.csv; the quiet run's does not."""
    for name, load in (("full", 2.1), ("linear", 3.0)):
        run = make_run(tmp_path / name, fake_results(name), curve=[(50, 1e12, 10, 3.0)])
        rows = [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]
        for row in rows:
            row.update({"load_average": load, "threads": 2, "peak_memory_mib": None})
        (run / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "r"
    write_report(OmegaConf.create({"runs": str(tmp_path / "*"), "output_dir": str(out)}), tmp_path)
    table = {
        line.split(" | ")[0]: line
        for line in (out / "report.md").read_text().splitlines()
        if line.startswith(("| full |", "| linear |")) and "M |" in line
    }
    assert "500*" in table["| linear"] and "500*" not in table["| full"]
    with open(out / "report.csv") as handle:
        shared = {r["mechanism"]: r["shared_cpu"] for r in csv.DictReader(handle)}
    assert shared == {"full": "False", "linear": "True"}


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
    make_run(tmp_path / "c", fake_results("full", model={"position": "rope"}))
    make_run(tmp_path / "d", fake_results("full", model={"position": "alibi"}))
    # Two hybrids differing in pattern and options: the pattern alone tells them apart.
    make_run(
        tmp_path / "e",
        fake_results(
            "hybrid",
            pattern=["linear", "linear", "sliding_window"],
            backends={"sliding_window": {"window": 64}},
        ),
    )
    make_run(tmp_path / "f", fake_results("hybrid", pattern=["rwkv", "full"], backends={}))
    runs, _ = load_runs(str(tmp_path / "*"))
    assert sorted(r.label for r in runs) == [
        "full (model.position=alibi)",
        "full (model.position=rope)",
        "hybrid (pattern=linear+linear+sliding_window)",
        "hybrid (pattern=rwkv+full)",
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


def test_the_longest_length_is_not_repeated_when_it_is_the_training_length(tmp_path):
    results, units = fake_results("full")
    results["train_context_length"] = 512  # the longest evaluated length
    make_run(tmp_path / "a", (results, units))
    write_report(
        OmegaConf.create({"runs": str(tmp_path / "*"), "output_dir": str(tmp_path / "r")}), tmp_path
    )
    header = next(
        line
        for line in (tmp_path / "r" / "report.md").read_text().splitlines()
        if line.startswith("| mechanism | seeds |")
    )
    assert header.count("ppl @512 |") == 1


def test_one_arm_with_two_seeds_shows_its_noise_floor(tmp_path):
    make_run(tmp_path / "a", fake_results("full", seed=1))
    make_run(tmp_path / "b", fake_results("full", quality=1.01, seed=2))
    write_report(
        OmegaConf.create({"runs": str(tmp_path / "*"), "output_dir": str(tmp_path / "r")}), tmp_path
    )
    text = (tmp_path / "r" / "report.md").read_text()
    assert "runs: 2 (1 arm)" in text and "Paired differences" not in text
    row = next(line for line in text.splitlines() if line.startswith("| full | 1 vs 2 |"))
    value, low, high = interval_cell(row.split("|")[3].strip())
    assert value == pytest.approx(-0.01 * 2.256 * 1.05, abs=5e-4) and low < value < high < 0
