"""The kernel seam: which implementation of a mechanism runs, chosen by `attention.kernel`.

Every backend lists the kernels it implements (`Backend.kernels`), fastest on a GPU first.
`auto` resolves per call from the device of the tensors: on CUDA the first of them that is
available there, `torch` elsewhere (the reference-checked kernels that also train on a CPU).
A kernel asked for by name runs wherever it can, CPU included (FlexAttention's compiled forward,
fla's Triton kernels under TRITON_INTERPRET=1); where it cannot, the error says why. Cores
never test the device themselves: they ask `resolve_kernel`.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

import torch

from longctx.errors import ConfigError

AUTO = "auto"
TORCH = "torch"
FLEX = "flex"
FLA = "fla"
KERNELS = (AUTO, TORCH, FLEX, FLA)
# The oldest torch the GPU kernels are written for (pyproject.toml states it too): FlexAttention's
# BlockMask.from_kv_blocks(seq_lengths=...) and dynamo's `recompile_limit` need torch >= 2.7, and
# the Docker image ships 2.8.
TORCH_FLOOR = (2, 8)


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def unavailable_reason(kernel: str, device: torch.device) -> str | None:
    """Why `kernel` cannot run on `device` here, or None when it can."""
    if kernel == TORCH:
        return None
    if kernel == FLEX:
        if torch_version() < TORCH_FLOOR:
            floor = ".".join(map(str, TORCH_FLOOR))
            return f"this torch ({torch.__version__}) is older than the Flex kernels' {floor}"
        return None
    if kernel == FLA:
        if importlib.util.find_spec("fla") is None:
            return "flash-linear-attention is not installed (pip install -e '.[gpu]')"
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return "fla's Triton kernels need a CUDA device (or TRITON_INTERPRET=1 on the CPU)"
        return None
    return f"unknown kernel {kernel!r}"


def check_kernel_choice(backend: str, requested: str, supported: Sequence[str]) -> None:
    """Config-time check of `attention.kernel` against the kernels a backend implements."""
    if requested == AUTO or requested in supported:
        return
    raise ConfigError(
        f"attention={backend} has no kernel {requested!r}; choose one of "
        f"{[AUTO, *supported]} (auto picks the fastest available for the device)"
    )


def resolve_kernel(requested: str, supported: Sequence[str], device: torch.device) -> str:
    """The kernel to run on `device`: `requested`, or for `auto` the best available one."""
    if requested == AUTO:
        if device.type != "cuda":
            return TORCH
        return next(k for k in (*supported, TORCH) if unavailable_reason(k, device) is None)
    reason = unavailable_reason(requested, device)
    if reason is not None:
        raise RuntimeError(
            f"attention.kernel={requested} cannot run on {device.type}: {reason}; "
            "use attention.kernel=auto"
        )
    return requested
