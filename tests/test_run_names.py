"""Run names that say what differs, evaluation runs named after their checkpoint, seed sweeps,
and a smoke sweep that compares different things."""

from __future__ import annotations

import re

import pytest
from conftest import compose_config
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from longctx.attention import build_backend
from longctx.core.run_names import eval_run_name, sweep_values
from longctx.model import model_dims


def names(*overrides: str) -> tuple[str, str]:
    cfg = compose_config(*overrides)
    HydraConfig.instance().set_config(cfg)
    return cfg.run_name, cfg.run_group


def test_rope_and_alibi_runs_of_one_backend_have_different_names():
    rope, rope_group = names("attention=full")
    alibi, alibi_group = names("attention=full", "model.position=alibi")
    assert rope == "full-mini-bundled-ctx512-s1337"
    assert alibi == "full-mini-position@alibi-bundled-ctx512-s1337"
    assert rope_group != alibi_group and not alibi_group.endswith("s1337")


def test_names_hold_every_non_default_backend_setting_and_stay_path_safe():
    window, _ = names("attention=sliding_window", "attention.window=64", "seed=7")
    assert window == "sliding_window-window@64-mini-bundled-ctx512-s7"
    hybrid, _ = names(
        "++attention={name:hybrid,pattern:[rwkv,full],backends:{rwkv:{version:4}}}",
        "data=synthetic",
    )
    assert hybrid.startswith("hybrid-backends.rwkv.version@4-pattern@rwkv+full-mini-synthetic")
    assert not set(hybrid) & set("=, /[]{}")


def test_an_evaluation_is_named_after_its_checkpoint_run(tmp_path):
    run = tmp_path / "2026-01-01_10-00-00_full-mini-bundled-ctx512-s1337"
    assert eval_run_name(f"{run}/checkpoints/last.ckpt") == "eval-full-mini-bundled-ctx512-s1337"
    job = tmp_path / "3_rwkv-mini-bundled-ctx512-s1"
    assert eval_run_name(f"{job}/checkpoints/last.ckpt") == "eval-rwkv-mini-bundled-ctx512-s1"
    # A run directory without the backend in its name: the backend from its saved config.
    other = tmp_path / "my_run"
    (other / ".hydra").mkdir(parents=True)
    OmegaConf.save({"attention": {"name": "linear"}}, other / ".hydra" / "config.yaml")
    assert eval_run_name(f"{other}/checkpoints/last.ckpt") == "eval-linear-my_run"
    assert eval_run_name(None) == "report"
    cfg = compose_config(f"ckpt_path={run}/checkpoints/last.ckpt", config_name="eval")
    HydraConfig.instance().set_config(cfg)
    # <time>_<name>_<per-process token> (two evaluations started in one second get two dirs)
    assert re.search(r"_eval-full-mini-bundled-ctx512-s1337_[0-9a-f]+$", cfg.hydra.run.dir)


def sweep(cfg, key: str) -> list:
    return list(
        OverridesParser.create()
        .parse_override(f"{key}={cfg.hydra.sweeper.params[key]}")
        .sweep_iterator()
    )


@pytest.mark.parametrize("experiment", ["compare_cpu", "recall_cpu", "smoke"])
def test_seeds_become_one_job_per_seed(experiment):
    cfg = compose_config(f"experiment={experiment}", "seeds=[1337,1338]")
    assert sweep(cfg, "seed") == [1337, 1338]
    assert sweep_values([5]) == "5" and sweep_values(3) == "3"


def test_smoke_runs_every_backend_with_a_window_shorter_than_its_context():
    """`-m experiment=smoke attention=full,sliding_window` compares two different mechanisms."""
    for name in ("sliding_window", "local", "longformer", "dilated", "moba"):
        cfg = compose_config("experiment=smoke", f"attention={name}")
        backend = build_backend(cfg.attention, model_dims(cfg))
        backend.check_sequence_length(cfg.context_length)
        reach = cfg.attention.get("window") or cfg.attention.get("block_size")
        assert reach < cfg.context_length, name
