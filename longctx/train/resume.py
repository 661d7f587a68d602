"""A resumed run is the run it continues: what makes it that run comes from its checkpoint.

The checkpoint holds the resolved config of the run that wrote it. Its architecture, data and
data order (the sections and keys below) are restored from it, so that
`python train.py hydra.run.dir=<run> ckpt_path=last` resumes any run without repeating its
overrides. A command-line override that contradicts them is refused, naming the setting: the
weights could not continue under it. Everything else (optimizer, trainer, logging, evaluation)
is this run's own, and each change against the checkpoint is logged. docs/resume.md lists both.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict

from longctx.errors import ConfigError

log = logging.getLogger(__name__)

# Sections and root keys that make the run what it is: the weights fit them and the data
# position of the checkpoint counts windows and rows cut by them.
RUN_SECTIONS = ("attention", "model", "data", "tokenizer")
RUN_KEYS = ("context_length", "sampling", "batch_size", "seed")
# Inside those sections, how or where rather than what: this run's values always apply.
FREE_KEYS = frozenset(
    {
        "attention.kernel",
        "model.activation_checkpointing",
        "data.cache_dir",
        "data.num_proc",
        "data.max_eval_windows",
    }
)
# Where files are: restored unless given; given, a new location of the same files.
LOCATION_KEYS = frozenset({"data.data_files", "tokenizer.path"})
# Never compared: the run's name and place, and the resume itself.
NOT_COMPARED = frozenset(
    {"hydra", "paths", "ckpt_path", "run_name", "run_group", "task_name", "tags", "logger"}
)
_ABSENT = object()
_SHOWN = 3  # settings listed by name in one message; the rest are counted


def command_line_overrides() -> list[str] | None:
    """The key=value overrides of this Hydra job; None outside Hydra (nothing is known)."""
    if not HydraConfig.initialized():
        return None
    return list(HydraConfig.get().overrides.task)


def explicit_setting(overrides: list[str] | None) -> Callable[[str], bool]:
    """key -> whether the command line sets it, itself or through its group (`model=tiny`
    sets every model.* key). Without Hydra every key counts as set: nothing may be assumed."""
    if overrides is None:
        return lambda key: True
    given = [
        override.key_or_group
        for override in OverridesParser.create().parse_overrides(overrides)
        if not override.key_or_group.startswith("hydra")
    ]
    return lambda key: any(key == g or key.startswith(g + ".") for g in given)


def continue_run(
    cfg: DictConfig, saved: dict[str, Any], shown: str, explicit: Callable[[str], bool]
) -> DictConfig:
    """This run's config with the checkpoint's run settings restored; a ConfigError for any
    that the command line contradicts. `shown` names the checkpoint in messages."""
    merged = copy.deepcopy(cfg)
    conflicts, restored, relocated = [], [], []
    blocks = [(section, section + ".") for section in RUN_SECTIONS] + [(None, "")]
    for section, prefix in blocks:
        if section is None:  # the root keys
            current = {key: _plain(cfg, key) for key in RUN_KEYS if key in cfg}
            before = {key: saved[key] for key in RUN_KEYS if key in saved}
        else:
            current = _flat(_plain(cfg, section) or {}, prefix)
            before = _flat(saved.get(section) or {}, prefix)
        replaced = section is not None and current.get(prefix + "name") != before.get(
            prefix + "name"
        )
        result = {}
        for key in sorted(current.keys() | before.keys()):
            now, then = current.get(key, _ABSENT), before.get(key, _ABSENT)
            if key in FREE_KEYS or now == then:
                value = now if key in FREE_KEYS else then
            elif explicit(key) and key in LOCATION_KEYS and now is not _ABSENT:
                value = now
                relocated.append(f"{key}={now!r} (the checkpoint's run read {then!r})")
            elif explicit(key):
                conflicts.append(
                    f"{key} is {_shown(then)} in the checkpoint but {_shown(now)} here"
                )
                continue
            elif then is _ABSENT:
                # A setting the run did not have: dropped with a section restored whole (another
                # backend's option), kept otherwise (a setting newer than the checkpoint).
                if replaced:
                    continue
                value = now
            else:
                value = then
                restored.append(f"{key}={then!r}")
            if value is not _ABSENT:
                result[key] = value
        with open_dict(merged):
            if section is None:
                for key, value in result.items():
                    merged[key] = value
            else:
                merged[section] = _nested(result, prefix)
    if conflicts:
        raise ConfigError(
            f"ckpt_path={shown} continues another run: {_listed(conflicts)}. These settings make "
            "the run what it is; leave them off the command line to continue the checkpoint's "
            "run (they are restored from it), or start a new run without ckpt_path"
        )
    if restored:
        log.warning("resuming: restored from the checkpoint: %s", _listed(restored))
    for line in relocated:
        log.warning("resuming: reading files from a new place: %s", line)
    _log_changes(merged, saved)
    return merged


def _log_changes(cfg: DictConfig, saved: dict[str, Any]) -> None:
    """Each setting of this run that differs from the checkpoint's run (applied, not refused)."""
    changed = []
    for key in cfg:
        if key in NOT_COMPARED or key in RUN_SECTIONS or key in RUN_KEYS:
            continue
        now = _flat({key: _plain(cfg, key)}, "")
        then = _flat({key: saved[key]} if key in saved else {}, "")
        for leaf in sorted(now.keys() | then.keys()):
            if now.get(leaf, _ABSENT) != then.get(leaf, _ABSENT):
                changed.append(
                    f"{leaf}: {_shown(then.get(leaf, _ABSENT))} -> {_shown(now.get(leaf, _ABSENT))}"
                )
    if changed:
        log.warning("resuming with settings changed since the checkpoint: %s", "; ".join(changed))


def _plain(cfg: DictConfig, key: str) -> Any:
    node = cfg.get(key)
    if isinstance(node, DictConfig) or OmegaConf.is_list(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def _flat(node: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Nested dicts as dotted keys under `prefix`; lists and empty dicts are values."""
    flat = {}
    for key, value in node.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _nested(flat: dict[str, Any], prefix: str) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.removeprefix(prefix).split(".")
        node = nested
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return nested


def _shown(value: Any) -> str:
    return "unset" if value is _ABSENT else repr(value)


def _listed(items: list[str]) -> str:
    more = len(items) - _SHOWN
    return "; ".join(items[:_SHOWN]) + (f"; and {more} more" if more > 0 else "")
