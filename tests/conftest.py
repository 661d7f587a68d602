"""Shared fixtures: configs composed with Hydra's compose API, exactly as train.py sees them."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import fla_interpreter
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = str(ROOT / "conf")

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# Without CUDA, fla's Triton kernels run on CPU tensors under Triton's interpreter, with two shims
# (tests/fla_interpreter.py). triton.jit reads TRITON_INTERPRET when a kernel is defined, triton's
# own library included, and lightning imports triton while the tests are collected: so it is set
# here, before any test module loads. On a CPU it changes nothing else (inductor emits C++ there).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if importlib.util.find_spec("triton") is not None:
        fla_interpreter.install_shims()


# A tiny run that trains a few steps on the CPU with a plain logger and no evaluation: the
# overrides the end-to-end tests of training, resume and checkpoints start from.
SMALL_RUN = (
    "model=tiny",
    "trainer=debug",
    "context_length=32",
    "batch_size=4",
    "logger=csv",
    "eval_after_fit=false",
)


# Bench settings that finish in seconds on a CPU (tests of the bench itself).
TINY_BENCH = dict(
    backends="all",
    options={},
    anchors=[],
    lengths=[32, 64],
    dtypes=["fp32"],
    modes=["fwd_bwd", "decode"],
    batch=1,
    heads=2,
    head_dim=8,
    model_size="tiny",
    device="cpu",
    threads=None,
    seed=0,
    warmup=0,
    repeats=1,
    decode_tokens=2,
    prefill_chunk=16,
    config_budget_s=60,
    memory_cap_mib=2048,
    total_budget_s=600,
    rounds=1,
    cpu_allocator="default",
)


def compose_config(*overrides: str, config_name: str = "train") -> DictConfig:
    """The root config with overrides, as Hydra composes it for a run (hydra node included)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)


def model_config(attention: str, options: dict | None = None, *overrides: str) -> DictConfig:
    """A tiny-model root config for `attention` with its options replaced by `options`."""
    cfg = compose_config(f"attention={attention}", "model=tiny", *overrides)
    with open_dict(cfg):
        for key, value in (options or {}).items():
            cfg.attention[key] = value
    return cfg


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"
