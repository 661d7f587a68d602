"""Run directories: never shared by accident, never left behind by a run that failed before
training, and never removed when the run did not create them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SMALL_RUN, compose_config
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from longctx.errors import ConfigError
from longctx.jobs import errors_in_one_line, finish_wandb, train, wandb_files_inside
from longctx.train.run_dir import claim_run_dir


def this_process_token() -> str:
    return OmegaConf.create({"token": "${run_id:}"}).token


def configure(out: Path, *overrides: str):
    cfg = compose_config(
        *SMALL_RUN,
        f"paths.root_dir={ROOT}",
        f"paths.output_dir={out}",
        f"data.cache_dir={out.parent / 'cache'}",
        *overrides,
    )
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out)
    HydraConfig.instance().set_config(cfg)
    return cfg


def test_run_and_sweep_directories_carry_a_token_of_their_process():
    cfg = compose_config(*SMALL_RUN, f"paths.log_dir={ROOT / 'outputs'}")
    HydraConfig.instance().set_config(cfg)
    token = this_process_token()
    assert len(token) == 6 and token == this_process_token()
    assert cfg.hydra.run.dir.endswith(f"_{token}")
    assert cfg.hydra.sweep.dir.endswith(f"_{token}")


def test_a_second_run_in_a_directory_in_use_is_refused(tmp_path):
    out = tmp_path / "run"
    cfg = configure(out)
    with claim_run_dir(out):  # as another process running there would hold it
        with pytest.raises(ConfigError, match=r"is in use by another run \(pid \d+ on "):
            train(cfg)
    assert not (out / "checkpoints").exists()


def test_a_directory_that_holds_a_run_is_not_started_again(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    torch.save({"global_step": 4}, out / "checkpoints" / "last.ckpt")
    with pytest.raises(ConfigError, match=r"already holds a run .*resume it with ckpt_path=last"):
        train(configure(out))
    assert torch.load(out / "checkpoints" / "last.ckpt")["global_step"] == 4


@pytest.mark.parametrize(
    "name,created_here,holds_checkpoint,removed",
    [
        ("made by this process", True, False, True),
        ("chosen by the user", False, False, False),
        ("made by this process, with a checkpoint", True, True, False),
    ],
)
def test_a_run_that_fails_before_training_removes_only_the_directory_it_created(
    tmp_path, capsys, name, created_here, holds_checkpoint, removed
):
    suffix = f"_{this_process_token()}" if created_here else ""
    out = tmp_path / "runs" / f"2026-01-01_00-00-00_tiny{suffix}"
    out.mkdir(parents=True)
    (out / "user_notes.txt").write_text("mine")
    if holds_checkpoint:
        (out / "checkpoints").mkdir()
        (out / "checkpoints" / "last.ckpt").write_bytes(b"...")
    cfg = configure(out, "model.n_head=0")
    with pytest.raises(SystemExit) as exit_status, errors_in_one_line():
        train(cfg)
    assert exit_status.value.code == 1
    printed = capsys.readouterr().err.strip().splitlines()
    assert printed == [
        "error: model.n_head=0 is not valid: it must be a whole number >= 1 (e.g. model.n_head=8)"
    ]
    assert out.exists() is not removed


def test_the_full_traceback_is_there_when_asked_for(tmp_path, monkeypatch):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ConfigError, match="model.n_head"), errors_in_one_line():
        train(configure(tmp_path / "run", "model.n_head=0"))


@pytest.mark.slow
def test_two_runs_started_in_the_same_second_get_their_own_directories(tmp_path):
    """The time stamp is pinned to be equal: only the per-process token can tell them apart."""
    runs = tmp_path / "runs"
    command = [
        sys.executable,
        "train.py",
        *SMALL_RUN,
        "trainer.max_steps=1",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={runs}/2026-01-01_00-00-00_tiny_${{run_id:}}",
    ]
    env = {**os.environ, "WANDB_MODE": "offline"}
    children = [
        subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    for child in children:
        _, stderr = child.communicate(timeout=600)
        assert child.returncode == 0, stderr[-3000:]
    directories = sorted(runs.iterdir())
    assert len(directories) == 2
    for directory in directories:
        assert torch.load(directory / "checkpoints" / "last.ckpt")["global_step"] == 1


def test_wandb_folders_point_into_the_run_directory_unless_the_user_chose_them(
    tmp_path, monkeypatch
):
    monkeypatch.delenv("WANDB_CACHE_DIR", raising=False)
    monkeypatch.delenv("WANDB_DATA_DIR", raising=False)
    monkeypatch.setenv("WANDB_DIR", "/users/own/choice")
    with wandb_files_inside(tmp_path):
        assert os.environ["WANDB_CACHE_DIR"] == str(tmp_path / "wandb" / "cache")
        assert os.environ["WANDB_DATA_DIR"] == str(tmp_path / "wandb" / "data")
        assert os.environ["WANDB_DIR"] == "/users/own/choice"
    assert "WANDB_CACHE_DIR" not in os.environ and "WANDB_DATA_DIR" not in os.environ
    assert os.environ["WANDB_DIR"] == "/users/own/choice"


def test_wandb_tables_of_a_run_stay_inside_its_directory(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "run"
    overrides = [
        "logger=wandb",
        "eval_after_fit=true",
        "trainer.max_steps=1",
        "eval.context_lengths=[16,32]",
        "eval.max_tokens=128",
        "+eval.strides=[null]",
        "+eval.passkey={enabled:false}",
        "+eval.prefix_ablation={enabled:false}",
    ]
    try:
        train(configure(out, *overrides))
    finally:
        finish_wandb()
    assert any((out / "wandb" / "data" / "artifacts").rglob("*")), "tables were staged"
    assert not (home / ".local" / "share" / "wandb").exists()
