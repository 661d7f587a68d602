"""Backends by name. Every module in `longctx.attention` registers its backends on import."""

from __future__ import annotations

from collections.abc import Mapping

from longctx.attention.base import Backend, ModelSettings
from longctx.errors import ConfigError

_BACKENDS: dict[str, type[Backend]] = {}


def register(cls: type[Backend]) -> type[Backend]:
    if cls.name in _BACKENDS:
        raise RuntimeError(f"attention backend {cls.name!r} registered twice")
    _BACKENDS[cls.name] = cls
    return cls


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def backend_class(name: str) -> type[Backend]:
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ConfigError(
            f"unknown attention backend {name!r}; valid choices: {', '.join(available_backends())}"
        ) from None


def build_backend(attn_cfg: Mapping, dims: ModelSettings) -> Backend:
    if "name" not in attn_cfg:
        raise ConfigError("the attention config has no 'name'; pick one with attention=<name>")
    return backend_class(attn_cfg["name"]).from_config(attn_cfg, dims)
