"""Device names from configs: `auto` is CUDA where available, the CPU otherwise."""

from __future__ import annotations

import torch

from longctx.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """`auto`, `cpu`, `cuda`, `cuda:<n>`; asking for CUDA where there is none is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r} is not a device; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available here; use device=cpu or auto")
    return device
