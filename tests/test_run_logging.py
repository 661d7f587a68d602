"""What a run logs stays with the run: a resume continues its wandb run and its progress bar,
the learning rate is logged once while the parameter groups share it, the loggers and
metrics.jsonl agree, the callbacks come from conf/callbacks, train.py returns a number to a
sweeper, and the known console noise is filtered."""

from __future__ import annotations

import csv
import logging
import math
import warnings
from pathlib import Path

import pytest
from conftest import ROOT, compose_config
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import EarlyStopping, ProgressBar

from longctx.core.cli import quiet_known_noise
from longctx.core.metrics_log import METRICS_FILE, read_metrics
from longctx.errors import ConfigError
from longctx.jobs import finish_wandb, sweep_objective, train
from longctx.train.callbacks import FinalStepCheckpoint, NonFiniteGuard, StreamStateCheckpoint
from longctx.train.loggers import RUN_ID_FILE, WandbRunLogger
from longctx.train.metrics_file import MetricsFile
from longctx.train.optimizer_stats import OptimizerStats
from longctx.train.progress_bar import TokensProgressBar
from longctx.train.run import build_callbacks

TINY_RUN = [
    "model=tiny",
    "trainer=debug",
    "context_length=32",
    "batch_size=4",
    "eval_after_fit=false",
    "checkpoint_every_n_steps=2",
    f"paths.root_dir={ROOT}",
]


def run(out: Path, cache: Path, *overrides: str) -> dict[str, float]:
    cfg = compose_config(
        *TINY_RUN, f"paths.output_dir={out}", f"data.cache_dir={cache}", *overrides
    )
    HydraConfig.instance().set_config(cfg)
    try:
        return train(cfg)
    finally:
        finish_wandb()


def offline_run_ids(out: Path) -> list[str]:
    return sorted(path.name.rsplit("-", 1)[-1] for path in (out / "wandb").glob("offline-run-*"))


def test_a_resume_continues_the_wandb_run_and_the_progress_bar(tmp_path, capsys):
    out, cache = tmp_path / "run", tmp_path / "cache"
    shown = ["logger=wandb", "trainer.enable_progress_bar=true"]
    run(out, cache, *shown)
    first = capsys.readouterr().out
    run_id = (out / RUN_ID_FILE).read_text().strip()
    assert offline_run_ids(out) == [run_id]
    run(out, cache, *shown, "ckpt_path=last", "trainer.max_steps=6")
    resumed = capsys.readouterr().out
    assert (out / RUN_ID_FILE).read_text().strip() == run_id
    assert offline_run_ids(out) == [run_id, run_id]  # two processes, one wandb run
    # The bar counts optimizer steps out of max_steps, from the checkpoint's step on a resume.
    assert "Training: 100%" in first and "4/4" in first
    assert "4/6" in resumed and "6/6" in resumed and "?/6" not in resumed
    for text in (first, resumed):
        assert "tokens/s=" in text and "v_num" not in text and "it/s" not in text


def test_a_fresh_run_in_a_kept_directory_gets_a_new_wandb_run(tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    out.mkdir()
    (out / RUN_ID_FILE).write_text("oldrunid\n")
    run(out, cache, "logger=wandb", "trainer.max_steps=1")
    assert (out / RUN_ID_FILE).read_text().strip() != "oldrunid"


def test_wandb_is_not_told_the_setting_it_warns_about():
    logger = WandbRunLogger(project="longctx", offline=True)
    assert "anonymous" not in logger._wandb_init


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory) -> tuple[Path, dict[str, float]]:
    """Six steps without validation (val_check_interval past max_steps), logger=csv."""
    base = tmp_path_factory.mktemp("logging")
    out = base / "run"
    metrics = run(
        out,
        base / "cache",
        "logger=csv",
        "trainer.max_steps=6",
        "trainer.val_check_interval=100",
        "trainer.log_every_n_steps=2",
    )
    return out, metrics


def logged_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "csv" / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def test_the_learning_rate_is_logged_once_and_agrees_with_the_metrics_file(csv_run):
    out, _ = csv_run
    rows = logged_rows(out)
    columns = set(rows[0])
    assert "train/lr" in columns and "train/grad_norm" in columns
    assert not [c for c in columns if "pg1" in c or "pg2" in c or c.startswith("lr-")]
    logged_lr = sorted(float(r["train/lr"]) for r in rows if r.get("train/lr"))
    logged_norm = sorted(float(r["train/grad_norm"]) for r in rows if r.get("train/grad_norm"))
    training = [r for r in read_metrics(out / METRICS_FILE) if "loss" in r]
    assert [r["step"] for r in training] == [2, 4, 6]
    assert logged_lr == pytest.approx(sorted(r["lr"] for r in training), rel=1e-6)
    assert logged_norm == pytest.approx(sorted(r["grad_norm"] for r in training), rel=1e-5)


def test_train_returns_the_training_loss_when_no_validation_ran(csv_run):
    _, metrics = csv_run
    assert "val/loss" not in metrics
    assert sweep_objective(metrics) == metrics["train/loss"] and math.isfinite(
        metrics["train/loss"]
    )


def test_the_sweep_objective_prefers_the_validation_loss():
    assert sweep_objective({"val/loss": 2.5, "train/loss": 3.0}) == 2.5
    assert sweep_objective({"train/loss": 3.0}) == 3.0
    assert math.isnan(sweep_objective({}))  # a requeued finished run: nothing trained


def callbacks_of(tmp_path: Path, *overrides: str) -> list:
    cfg = compose_config(*overrides)
    callbacks, _ = build_callbacks(cfg, tmp_path)
    return callbacks


ALWAYS = (FinalStepCheckpoint, NonFiniteGuard, StreamStateCheckpoint, MetricsFile)


def test_the_callbacks_group_composes_and_keeps_the_projects_callbacks(tmp_path):
    default = callbacks_of(tmp_path)
    assert any(isinstance(c, TokensProgressBar) for c in default)
    assert any(isinstance(c, OptimizerStats) for c in default)
    assert not any(isinstance(c, EarlyStopping) for c in default)
    stopping = callbacks_of(
        tmp_path, "callbacks=[default,early_stopping]", "callbacks.early_stopping.patience=5"
    )
    (early,) = [c for c in stopping if isinstance(c, EarlyStopping)]
    assert early.patience == 5 and early.monitor == "val/loss"
    lean = callbacks_of(tmp_path, "callbacks=none")
    for kind in ALWAYS:
        assert any(isinstance(c, kind) for c in default) and any(isinstance(c, kind) for c in lean)
    assert not any(isinstance(c, (OptimizerStats, ProgressBar)) for c in lean)
    mqar = callbacks_of(tmp_path, "experiment=mqar_cpu")
    assert any(isinstance(c, EarlyStopping) and c.monitor == "val/accuracy" for c in mqar)
    without_throughput = callbacks_of(tmp_path, "~callbacks.throughput")
    assert len(without_throughput) == len(default) - 1


def test_a_disabled_progress_bar_leaves_the_bar_callback_out(tmp_path):
    assert not any(isinstance(c, ProgressBar) for c in callbacks_of(tmp_path, "trainer=debug"))


def test_a_callback_entry_without_a_target_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"callbacks.mine is not a callback config"):
        callbacks_of(tmp_path, "+callbacks.mine={patience: 3}")
    with pytest.raises(ConfigError, match="is not a Lightning Callback"):
        callbacks_of(tmp_path, "+callbacks.mine={_target_: collections.OrderedDict}")


def test_known_noise_is_filtered_and_other_warnings_stay(caplog):
    quiet_known_noise()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet_known_noise()  # after simplefilter, as at an entry point
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", stacklevel=1)
        warnings.warn("something the user should see", stacklevel=1)
    assert [str(w.message) for w in caught] == ["something the user should see"]
    tips = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger=tips.name):
        tips.info("💡 Tip: For seamless cloud logging ...")
        tips.info("GPU available: False")
    assert "Tip" not in caplog.text and "GPU available" in caplog.text


def test_the_search_config_is_a_grid_the_basic_sweeper_expands():
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = compose_config("hparams_search=lr_grid", "experiment=smoke", "seeds=[1,2]")
    params = {k: v for k, v in cfg.hydra.sweeper.params.items() if k != "seed"}
    overrides = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    (jobs,) = BasicSweeper.split_arguments(overrides, max_batch_size=None)
    assert len(jobs) == 6 and ["optim.lr=0.001", "optim.warmup_steps=20"] in jobs
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
