"""`attention.kernel`: the seam that picks each backend's implementation (longctx/ops/seam.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import model_config

from longctx import build_model
from longctx.errors import ConfigError
from longctx.ops.seam import AUTO, FLA, FLEX, TORCH, resolve_kernel

CPU = torch.device("cpu")


def test_auto_is_the_torch_kernel_off_cuda():
    assert resolve_kernel(AUTO, (FLEX, TORCH), CPU) == TORCH
    assert resolve_kernel(AUTO, (FLA, TORCH), CPU) == TORCH


def test_a_kernel_the_backend_lacks_is_refused_at_config_time():
    with pytest.raises(ConfigError, match=r"attention=full has no kernel 'nonsense'.*auto"):
        build_model(model_config("full", {"kernel": "nonsense"}), 11)


def test_fla_forced_without_cuda_or_the_interpreter_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="kernel=fla cannot run on cpu"):
        resolve_kernel(FLA, (FLA, TORCH), CPU)


def test_aft_conv_keeps_its_integer_kernel_length_beside_the_implementation_name():
    by_length = build_model(model_config("aft_conv", {"kernel": 5}), 11)
    assert by_length.backend.options.kernel == 5 and by_length.backend.kernel == AUTO
    by_name = build_model(model_config("aft_conv", {"kernel": "torch"}), 11)
    assert by_name.backend.options.kernel == 64 and by_name.backend.kernel == TORCH
