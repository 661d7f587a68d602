"""Attention backends. Each module here registers its backends;
importing the package loads them all."""

import importlib
import pkgutil

from longctx.attention.base import Backend, Mixer, ModelSettings, StatelessMixer
from longctx.attention.registry import available_backends, backend_class, build_backend, register

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "Backend",
    "Mixer",
    "ModelSettings",
    "StatelessMixer",
    "available_backends",
    "backend_class",
    "build_backend",
    "register",
]
