"""Names of runs that say what differs: every setting of the backend and of the model that is not
its config file's default, so that two runs of one mechanism (RoPE and ALiBi, two windows) never
share a name, a wandb group or a plot label.

`${run_name:...}` (conf/train.yaml) names a training run, e.g.
`sliding_window-window@64-mini-position@alibi-bundled-ctx512-s1337`: the backend, its settings
that differ from conf/attention/<backend>.yaml, the model preset, its settings that differ from
conf/model/<preset>.yaml, the corpus, the training length and the seed. Names hold only
characters that paths and Hydra overrides take unquoted (no `=`, `,` or spaces).
`${eval_run_name:...}` (conf/eval.yaml) names an evaluation after the checkpoint's run.
`${sweep_values:${seeds}}` turns a list into a Hydra sweep (`seeds=[1,2]` runs every arm of an
experiment once per seed).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# Hydra run directories: `<date>_<time>_<name>` (single runs) or `<job number>_<name>` (sweeps).
RUN_DIR_PREFIX = re.compile(r"^(\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}_|\d+_)")


def _plain(node: Any) -> Any:
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def flatten(settings: Mapping, prefix: str = "") -> dict[str, Any]:
    """{"backends": {"sliding_window": {"window": 64}}} -> {"backends.sliding_window.window": 64}.

    An empty mapping stays a value of its own, so that `backends: {}` differs from a filled one.
    """
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def differing_settings(settings: Mapping, defaults: Mapping) -> dict[str, Any]:
    """The flattened settings whose value is not the default's (or that have no default)."""
    flat, base = flatten(_plain(settings)), flatten(_plain(defaults))
    return {k: v for k, v in sorted(flat.items()) if k not in base or base[k] != v}


def config_defaults(group: str, option: str | None) -> dict[str, Any]:
    """conf/<group>/<option>.yaml as a plain dict (empty when there is no such file)."""
    path = CONF_DIR / group / f"{option}.yaml"
    if not option or not path.is_file():
        return {}
    loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    return {k: v for k, v in loaded.items() if k != "defaults"}


def value_text(value: Any) -> str:
    """A setting's value as it reads in a label: lists joined by `+`, other values plainly."""
    if isinstance(value, (list, tuple)):
        return "+".join(value_text(v) for v in value)
    if isinstance(value, Mapping):
        return json.dumps(value, sort_keys=True) if value else "{}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _name_piece(text: str) -> str:
    """Characters a path and an unquoted Hydra override both take."""
    return re.sub(r"[^A-Za-z0-9_.+@-]", "_", text)


def setting_pieces(settings: Mapping) -> list[str]:
    return [_name_piece(f"{k}@{value_text(v)}") for k, v in settings.items()]


def run_name(model_choice: str | None, seed: Any = None, *, _root_: DictConfig) -> str:
    """The resolver behind conf/train.yaml's run_name (with the seed) and run_group (without)."""
    attention = _plain(_root_["attention"])
    model = _plain(_root_["model"])
    backend = attention.get("name", "attention")
    attention_diff = differing_settings(
        {k: v for k, v in attention.items() if k != "name"},
        {k: v for k, v in config_defaults("attention", backend).items() if k != "name"},
    )
    model_diff = differing_settings(model, config_defaults("model", model_choice))
    pieces = [_name_piece(str(backend)), *setting_pieces(attention_diff)]
    pieces += [_name_piece(str(model_choice or "model")), *setting_pieces(model_diff)]
    pieces += [_name_piece(str(_root_["data"]["name"])), f"ctx{_root_['context_length']}"]
    if seed is not None:
        pieces.append(f"s{seed}")
    return "-".join(pieces)


def eval_run_name(ckpt_path: str | None) -> str:
    """`eval-<the checkpoint's run name>` (its backend first), or `report` without a checkpoint."""
    if not ckpt_path:
        return "report"
    path = Path(str(ckpt_path))
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    name = RUN_DIR_PREFIX.sub("", run_dir.name) or path.stem
    saved = run_dir / ".hydra" / "config.yaml"
    backend = None
    if saved.is_file():
        backend = OmegaConf.load(saved).get("attention", {}).get("name")
    if backend and not name.startswith(str(backend)):
        name = f"{backend}-{name}"
    return "eval-" + _name_piece(name)


def sweep_values(values: Any) -> str:
    """[1337, 1338] -> "1337,1338": a sweeper parameter that runs one job per value."""
    values = _plain(values)
    return ",".join(map(str, values if isinstance(values, (list, tuple)) else [values]))


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("run_name", run_name, replace=True)
    OmegaConf.register_new_resolver("eval_run_name", eval_run_name, replace=True)
    OmegaConf.register_new_resolver("sweep_values", sweep_values, replace=True)
