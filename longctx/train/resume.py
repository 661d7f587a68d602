"""A resumed run is the run it continues: its settings come from its checkpoint.

The checkpoint holds the resolved config of the run that wrote it. Every setting the command
line does not give is restored from it, so that `python train.py hydra.run.dir=<run>
ckpt_path=last` resumes any run without repeating its overrides. A setting the command line
gives applies, and is logged, unless it changes what makes the run that run (its architecture,
data and data order: RUN_SECTIONS and RUN_KEYS): the weights could not continue under it, so
that is refused, naming the setting. docs/resume.md lists both kinds.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict

from longctx.core.run_names import flatten
from longctx.errors import ConfigError

log = logging.getLogger(__name__)

# Sections and root keys that make the run what it is: the weights fit them and the data
# position of the checkpoint counts windows and rows cut by them.
RUN_SECTIONS = ("attention", "model", "data", "tokenizer")
RUN_KEYS = ("context_length", "sampling", "batch_size", "seed")
# How or where rather than what, or this run's own place: this run's values always apply.
FREE_KEYS = frozenset(
    {
        "attention.kernel",
        "model.activation_checkpointing",
        "data.cache_dir",
        "data.num_proc",
        "data.max_eval_windows",
        "trainer.default_root_dir",
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
    """This run's config for continuing the checkpoint's run.

    A setting the command line does not give is the checkpoint's. One it gives applies and is
    logged, unless it is one of the run's own settings (RUN_SECTIONS, RUN_KEYS) with another
    value: that is a ConfigError naming it. `shown` names the checkpoint in messages.
    """
    merged = copy.deepcopy(cfg)
    conflicts, changed, restored, relocated = [], [], [], []
    for top in sorted((set(cfg) | set(saved)) - NOT_COMPARED):
        own = top in RUN_SECTIONS or top in RUN_KEYS
        current = flatten({top: _plain(cfg, top)}) if top in cfg else {}
        before = flatten({top: saved[top]}) if top in saved else {}
        # Another backend, corpus or tokenizer: its options are the checkpoint's, all of them.
        replaced = top in RUN_SECTIONS and current.get(f"{top}.name") != before.get(f"{top}.name")
        result = {}
        # The section's name first: the one difference that explains the others.
        keys = sorted(current.keys() | before.keys(), key=lambda k: (k != f"{top}.name", k))
        for key in keys:
            now, then = current.get(key, _ABSENT), before.get(key, _ABSENT)
            if key in FREE_KEYS:
                value = now
            elif now == then:
                value = then
            elif explicit(key) and own and key in LOCATION_KEYS and now is not _ABSENT:
                value = now
                relocated.append(f"{key}={now!r} (the checkpoint's run read {then!r})")
            elif explicit(key) and own:
                conflicts.append(
                    f"{key} is {_shown(then)} in the checkpoint but {_shown(now)} here"
                )
                continue
            elif explicit(key):
                value = now
                changed.append(f"{key}: {_shown(then)} -> {_shown(now)}")
            elif then is _ABSENT:
                # Not in the checkpoint's run: another backend's option goes with its backend; a
                # setting newer than the checkpoint keeps its default.
                value = _ABSENT if replaced else now
            else:
                value = then
                restored.append((own, key, f"{key}={then!r}"))
            if value is not _ABSENT:
                result[key] = value
        nested = _nested(result)
        if top in nested:
            with open_dict(merged):
                merged[top] = nested[top]
    if conflicts:
        raise ConfigError(
            f"ckpt_path={shown} continues another run: {_listed(conflicts)}. These settings make "
            "the run what it is; leave them off the command line to continue the checkpoint's "
            "run (they are restored from it), or start a new run without ckpt_path"
        )
    if restored:
        log.warning("resuming: restored from the checkpoint: %s", _restored_summary(restored))
    if changed:
        log.warning("resuming with settings changed on the command line: %s", "; ".join(changed))
    for line in relocated:
        log.warning("resuming: reading files from a new place: %s", line)
    return merged


def _plain(cfg: DictConfig, key: str) -> Any:
    node = cfg.get(key)
    if isinstance(node, DictConfig) or OmegaConf.is_list(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = nested
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return nested


def _restored_summary(restored: list[tuple[bool, str, str]]) -> str:
    """The run's own settings one by one, the others counted by section."""
    named = [text for own, _, text in restored if own]
    others = sorted({key.split(".")[0] for own, key, _ in restored if not own})
    count = sum(1 for own, _, _ in restored if not own)
    if count:
        named.append(f"and {count} setting(s) of {', '.join(others)}")
    return "; ".join(named)


def _shown(value: Any) -> str:
    return "unset" if value is _ABSENT else repr(value)


def _listed(items: list[str]) -> str:
    more = len(items) - _SHOWN
    return "; ".join(items[:_SHOWN]) + (f"; and {more} more" if more > 0 else "")
