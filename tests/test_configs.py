"""Every config group composes; the CLI prints the job config and names valid choices."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CONF_DIR, ROOT, compose_config
from hydra.errors import MissingConfigException

from longctx import build_model
from longctx.core import precision

GROUPS = ["attention", "model", "data", "tokenizer", "trainer", "logger"]


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in group_options(g)])
def test_every_group_option_composes(group, option):
    cfg = compose_config(f"{group}={option}")
    assert cfg[group] is not None


@pytest.mark.parametrize("option", group_options("experiment"))
def test_every_experiment_composes(option):
    compose_config(f"experiment={option}")


def test_eval_config_composes():
    cfg = compose_config("ckpt_path=x.ckpt", config_name="eval")
    assert cfg.ckpt_path == "x.ckpt"


@pytest.mark.parametrize(
    "size,params",
    [("small", 124e6), ("medium", 350e6), ("large", 774e6), ("xl", 1.5e9), ("llama_1b", 1.14e9)],
)
def test_model_sizes_have_their_parameter_counts(size, params):
    cfg = compose_config(f"model={size}")
    with torch.device("meta"):
        model = build_model(cfg, 50257 if size != "llama_1b" else 32000)
    assert model.num_parameters() == pytest.approx(params, rel=0.12)


def test_wrong_group_choice_lists_valid_choices():
    with pytest.raises(MissingConfigException) as err:
        compose_config("attention=no_such_backend")
    assert "full" in str(err.value)


def test_cli_prints_job_config():
    out = subprocess.run(
        [sys.executable, "train.py", "--cfg", "job"], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "attention:" in out.stdout and "name: full" in out.stdout


@pytest.mark.parametrize("native_bf16, expected", [(True, "bf16-mixed"), (False, "32-true")])
@pytest.mark.parametrize("trainer", ["default", "cpu"])
def test_cpu_presets_autocast_to_bf16_only_where_the_cpu_multiplies_it(
    monkeypatch, trainer, native_bf16, expected
):
    """Emulated bf16 matmuls make a step many times slower than fp32: a CPU without native bf16
    trains in fp32 unless the user names a precision."""
    monkeypatch.setattr(precision, "cpu_multiplies_bf16", lambda: native_bf16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert compose_config(f"trainer={trainer}").trainer.precision == expected
    named = compose_config(f"trainer={trainer}", "trainer.precision=bf16-mixed")
    assert named.trainer.precision == "bf16-mixed"
    assert compose_config("trainer=debug").trainer.precision == "32-true"  # always fp32


def test_gpu_presets_keep_bf16_autocast():
    assert compose_config("trainer=gpu").trainer.precision == "bf16-mixed"
