"""The `eval:` config section as typed settings: defaults, unknown-key errors, validation.

conf/eval.yaml lists every key with these defaults (a test holds them equal); conf/train.yaml
sets only a few, the rest fall back to the defaults here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from longctx.errors import ConfigError


@dataclass
class PrefixAblationSettings:
    """Fixed target tokens scored with visible prefixes of 0, step, 2*step, 4*step, ... tokens."""

    enabled: bool = True
    target_tokens: int = 128
    step: int = 256
    max_length: int | None = (
        None  # longest input (prefix + targets); null: the longest context length
    )
    samples: int = 32


@dataclass
class PasskeySettings:
    """A random key hidden at a relative depth of filler text,
    ranked by likelihood against distractors."""

    enabled: bool = True
    lengths: list[int] | None = None  # null: the perplexity context lengths
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    trials: int = 4
    distractors: int = 4
    digits: int = 5
    seed: int = 0
    needle: str = "The pass key is {key}. Remember it. {key} is the pass key."
    question: str = "What is the pass key? The pass key is"


@dataclass
class FactRecallSettings:
    """Planted facts of corpora whose documents carry answer_char_spans (data=synthetic)."""

    enabled: bool = True
    lengths: list[int] | None = None  # null: the training context length
    max_docs: int = 64  # scored facts: each answer of a document counts once
    distractors: int = 4
    seed: int = 0


@dataclass
class StreamingSettings:
    """Perplexity with state carried through model.step over consecutive segments."""

    enabled: Any = "auto"  # auto: backends that train on ordered streams (backend.ordered_stream)
    segment_length: int | None = (
        None  # null: the training context length (what training steps over)
    )
    max_tokens: int = 65536


@dataclass
class BootstrapSettings:
    """Intervals of every figure: documents (or trials) resampled, never tokens (stats.py)."""

    resamples: int = 1000
    confidence: float = 0.95
    seed: int = 0


WINDOW_PLACEMENTS = ("spread", "prefix")


@dataclass
class EvalSettings:
    context_lengths: list[int] = field(default_factory=lambda: [64, 128, 256, 512, 1024])
    # null: non-overlapping windows; an integer: a stride in tokens; a fraction in (0, 1): that
    # fraction of each length (0.5: every scored token has at least half a window of context).
    strides: list[Any] = field(default_factory=lambda: [None, 0.5])
    max_tokens: int | None = 65536  # scored tokens per (length, stride); null: the whole split
    # spread: windows evenly spaced over the whole test split (each document's share follows its
    # length); prefix: the first windows of the split (how evaluations were made before).
    window_placement: str = "spread"
    min_bin_tokens: int = 256  # loss-by-position bins with fewer tokens are flagged `few_tokens`
    bootstrap: BootstrapSettings = field(default_factory=BootstrapSettings)
    batch_size: int = 8
    device: str = "auto"  # auto: cuda when available
    autocast: str | None = (
        None  # null: fp32; bf16: bfloat16 autocast (GPU evaluation at long lengths)
    )
    prefix_ablation: PrefixAblationSettings = field(default_factory=PrefixAblationSettings)
    passkey: PasskeySettings = field(default_factory=PasskeySettings)
    fact_recall: FactRecallSettings = field(default_factory=FactRecallSettings)
    streaming: StreamingSettings = field(default_factory=StreamingSettings)

    def validate(self) -> None:
        _positive_ints(self.context_lengths, "eval.context_lengths")
        for stride in self.strides:
            if stride is None or (
                isinstance(stride, int) and not isinstance(stride, bool) and stride > 0
            ):
                continue
            if isinstance(stride, float) and 0 < stride < 1:
                continue
            raise ConfigError(
                f"eval.strides entry {stride!r} is not valid; use null (non-overlapping), "
                "a positive integer (tokens) or a fraction in (0, 1) of the length"
            )
        if self.max_tokens is not None:
            _positive_ints([self.max_tokens], "eval.max_tokens")
        _positive_ints([self.batch_size, self.min_bin_tokens], "eval.batch_size/min_bin_tokens")
        if self.window_placement not in WINDOW_PLACEMENTS:
            raise ConfigError(
                f"eval.window_placement={self.window_placement!r} is not valid; use spread "
                "(windows over the whole test split) or prefix (the split's first windows)"
            )
        _positive_ints([self.bootstrap.resamples], "eval.bootstrap.resamples")
        if not 0 < self.bootstrap.confidence < 1:
            raise ConfigError(
                f"eval.bootstrap.confidence={self.bootstrap.confidence!r} must lie in (0, 1), "
                "e.g. 0.95"
            )
        if self.device not in ("auto", "cpu") and not str(self.device).startswith("cuda"):
            raise ConfigError(
                f"eval.device={self.device!r} is not valid; use auto, cpu or cuda[:index]"
            )
        if self.autocast not in (None, "bf16"):
            raise ConfigError(
                f"eval.autocast={self.autocast!r} is not valid; use null (fp32) or bf16"
            )
        prefix = self.prefix_ablation
        _positive_ints([prefix.target_tokens, prefix.step, prefix.samples], "eval.prefix_ablation")
        passkey = self.passkey
        if passkey.lengths is not None:
            _positive_ints(passkey.lengths, "eval.passkey.lengths")
        if any(not 0.0 <= d <= 1.0 for d in passkey.depths):
            raise ConfigError(f"eval.passkey.depths must lie in [0, 1], got {list(passkey.depths)}")
        _positive_ints([passkey.trials, passkey.distractors, passkey.digits], "eval.passkey")
        if passkey.distractors >= 9 * 10 ** (passkey.digits - 1):
            raise ConfigError(
                "eval.passkey.distractors must be smaller than the number of keys "
                "with that many digits"
            )
        if "{key}" not in passkey.needle:
            raise ConfigError("eval.passkey.needle must contain {key} where the pass key goes")
        recall = self.fact_recall
        if recall.lengths is not None:
            _positive_ints(recall.lengths, "eval.fact_recall.lengths")
        _positive_ints([recall.max_docs, recall.distractors], "eval.fact_recall")
        if self.streaming.enabled not in (True, False, "auto"):
            raise ConfigError(
                f"eval.streaming.enabled={self.streaming.enabled!r} is not valid; "
                "use auto, true or false"
            )
        _positive_ints([self.streaming.max_tokens], "eval.streaming.max_tokens")
        if self.streaming.segment_length is not None:
            _positive_ints([self.streaming.segment_length], "eval.streaming.segment_length")


def _positive_ints(values, key: str) -> None:
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ConfigError(f"{key} must hold positive integers, got {list(values)}")


def _build(cls, values: Mapping[str, Any], path: str):
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{path} has no setting(s) {unknown}; valid settings: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        default = (
            known[name].default_factory()
            if known[name].default_factory is not dataclasses.MISSING
            else None
        )
        if dataclasses.is_dataclass(default):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{path}.{name} must be a mapping of settings, got {value!r}")
            value = _build(type(default), value, f"{path}.{name}")
        kwargs[name] = value
    return cls(**kwargs)


def eval_settings(section: Mapping | DictConfig | None) -> EvalSettings:
    """Typed, validated settings from a config's `eval:` section
    (missing keys take the defaults)."""
    values = (
        OmegaConf.to_container(section, resolve=True)
        if isinstance(section, DictConfig)
        else dict(section or {})
    )
    settings = _build(EvalSettings, values, "eval")
    settings.validate()
    return settings


def settings_dict(settings: EvalSettings) -> dict:
    return dataclasses.asdict(settings)
