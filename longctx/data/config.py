"""Config helpers shared by the data modules: accept DictConfig or plain dicts."""

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf


def to_plain_dict(cfg: Mapping | DictConfig | None) -> dict[str, Any]:
    if cfg is None:
        return {}
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)


def stable_digest(*parts: Any, length: int = 16) -> str:
    """Hex digest of JSON-serialisable parts; identical across processes, unlike hash()."""
    payload = json.dumps(parts, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(payload).hexdigest()[:length]


def worker_processes(num_proc: int | None) -> int | None:
    """`datasets` starts a process pool for any num_proc, even 1; None keeps work in-process."""
    return num_proc if num_proc and num_proc > 1 else None
