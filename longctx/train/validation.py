"""Every numeric setting a user sets for train.py, checked before anything is built or read.

One table: the dotted key and what its value must be. A key the composed config does not hold
(another data preset's, say) is skipped. Backends check the ranges of their own `attention.*`
options (zero means "none" for some); here an option whose default is a whole number must be
one, and a real-valued option finite. longctx.eval.settings checks the `eval.*` settings.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from longctx.attention import available_backends, backend_class
from longctx.errors import ConfigError

_ABSENT = object()


@dataclass(frozen=True)
class Rule:
    """A test of a value and the words for what it must be, with an example of a valid one."""

    holds: Callable[[Any], bool]
    must_be: str
    example: str


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _optional(rule: Rule) -> Rule:
    return Rule(lambda v: v is None or rule.holds(v), f"null or {rule.must_be}", rule.example)


POSITIVE_INT = Rule(lambda v: _is_int(v) and v >= 1, "a whole number >= 1", "8")
NON_NEGATIVE_INT = Rule(lambda v: _is_int(v) and v >= 0, "a whole number >= 0", "0")
POSITIVE_NUMBER = Rule(lambda v: _is_number(v) and v > 0, "a finite number > 0", "3e-3")
NON_NEGATIVE_NUMBER = Rule(lambda v: _is_number(v) and v >= 0, "a finite number >= 0", "0.1")
UNIT_INTERVAL = Rule(lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]", "0.1")
BELOW_ONE = Rule(lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)", "0.1")
STEPS_OR_FRACTION = Rule(
    lambda v: (_is_int(v) and v >= 1) or (isinstance(v, float) and 0 < v <= 1),
    "a whole number of batches >= 1 or a fraction in (0, 1]",
    "200",
)
BATCHES_OR_FRACTION = Rule(
    lambda v: (_is_int(v) and v >= 0) or (isinstance(v, float) and 0 <= v <= 1),
    "a whole number of batches >= 0 or a fraction in [0, 1]",
    "16",
)
SEED = Rule(lambda v: _is_int(v) and 0 <= v < 2**32, "a whole number in [0, 2**32)", "1337")
BETAS = Rule(
    lambda v: (
        isinstance(v, (list, tuple))
        and len(v) == 2
        and all(_is_number(b) and 0 <= b < 1 for b in v)
    ),
    "two numbers in [0, 1)",
    "[0.9,0.95]",
)
POSITIVE_INTS = Rule(
    lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(POSITIVE_INT.holds(x) for x in v),
    "a non-empty list of whole numbers >= 1",
    "[64,256]",
)
SPLIT_FRACTIONS = Rule(
    lambda v: (
        isinstance(v, dict)
        and set(v) == {"train", "validation", "test"}
        and all(_is_number(f) and f >= 0 for f in v.values())
        and v["train"] > 0
        and math.isclose(sum(v.values()), 1.0, abs_tol=1e-6)
    ),
    "train/validation/test fractions >= 0 that sum to 1, train > 0",
    "{train:0.9,validation:0.05,test:0.05}",
)
SANITY_STEPS = Rule(lambda v: _is_int(v) and v >= -1, "a whole number >= -1 (-1: all)", "0")
DEVICES = Rule(
    lambda v: not _is_number(v) or (_is_int(v) and (v >= 1 or v == -1)),
    "a whole number >= 1, -1 (all), auto or a list of device ids",
    "1",
)
EPOCHS = Rule(lambda v: v is None or (_is_int(v) and v >= -1), "null or a whole number >= -1", "-1")

NUMERIC_SETTINGS: dict[str, Rule] = {
    "context_length": POSITIVE_INT,
    "batch_size": POSITIVE_INT,
    "num_workers": NON_NEGATIVE_INT,
    "seed": SEED,
    "checkpoint_every_n_steps": _optional(POSITIVE_INT),
    "optim.lr": POSITIVE_NUMBER,
    "optim.min_lr_ratio": UNIT_INTERVAL,
    "optim.weight_decay": NON_NEGATIVE_NUMBER,
    "optim.betas": BETAS,
    "optim.warmup_steps": NON_NEGATIVE_INT,
    "trainer.max_steps": POSITIVE_INT,
    "trainer.max_epochs": EPOCHS,
    "trainer.val_check_interval": _optional(STEPS_OR_FRACTION),
    "trainer.check_val_every_n_epoch": _optional(POSITIVE_INT),
    "trainer.limit_train_batches": _optional(STEPS_OR_FRACTION),
    "trainer.limit_val_batches": _optional(BATCHES_OR_FRACTION),
    "trainer.accumulate_grad_batches": POSITIVE_INT,
    "trainer.gradient_clip_val": _optional(NON_NEGATIVE_NUMBER),
    "trainer.log_every_n_steps": POSITIVE_INT,
    "trainer.num_sanity_val_steps": SANITY_STEPS,
    "trainer.num_nodes": POSITIVE_INT,
    "trainer.devices": DEVICES,
    "model.n_layer": POSITIVE_INT,
    "model.n_head": POSITIVE_INT,
    "model.d_model": POSITIVE_INT,
    "model.mlp_hidden": _optional(POSITIVE_INT),
    "model.rope_base": POSITIVE_NUMBER,
    "model.dropout": BELOW_ONE,
    "data.split_fractions": _optional(SPLIT_FRACTIONS),
    "data.split_seed": NON_NEGATIVE_INT,
    "data.num_proc": _optional(POSITIVE_INT),
    "data.max_eval_windows": _optional(POSITIVE_INT),
    "data.num_docs": POSITIVE_INT,
    "data.distances": POSITIVE_INTS,
    "data.prefix_chars": NON_NEGATIVE_INT,
    "data.facts": POSITIVE_INT,
    "data.code_length": POSITIVE_INT,
    "data.distractor_rate": UNIT_INTERVAL,
    "tokenizer.vocab_size": POSITIVE_INT,
    "tokenizer.max_train_bytes": _optional(POSITIVE_INT),
}


def validate_numbers(cfg: DictConfig) -> None:
    """A ConfigError naming the first numeric setting that is zero, negative, NaN or otherwise
    out of its range, and what it must be."""
    validate_attention_number_types(cfg)
    for key, rule in NUMERIC_SETTINGS.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is _ABSENT:
            continue
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
        if not rule.holds(value):
            raise ConfigError(
                f"{key}={value!r} is not valid: it must be {rule.must_be} "
                f"(e.g. {key}={rule.example})"
            )


def validate_attention_number_types(cfg: DictConfig) -> None:
    """attention.<option>: a whole number where the backend's default is one, and finite where
    it is a real number (NaN would pass every range check a backend makes)."""
    name = cfg.attention.get("name")
    if name not in available_backends():
        return  # the backend registry names the valid choices
    for option in dataclasses.fields(backend_class(name).Options):
        value = cfg.attention.get(option.name)
        default = option.default
        if value is None or option.name not in cfg.attention or isinstance(default, bool):
            continue
        if isinstance(default, int) and not _is_int(value):
            must_be = "a whole number"
        elif isinstance(default, float) and not _is_number(value):
            must_be = "a finite number"
        else:
            continue
        raise ConfigError(
            f"attention.{option.name}={value!r} is not valid for attention={name}: it must be "
            f"{must_be} (its default is {default!r})"
        )
