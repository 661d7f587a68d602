"""What to measure: the bench's settings (conf/bench.yaml) and the configurations they expand to."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from longctx.attention import available_backends, backend_class
from longctx.bench.allocator import check_cpu_allocator
from longctx.bench.anchors import ANCHORS
from longctx.core.device import resolve_device
from longctx.errors import ConfigError
from longctx.ops.seam import AUTO, KERNELS

DTYPES = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp64": torch.float64,
}
# fwd / fwd_bwd: the mixing kernel alone (`mix` on projected inputs; SDPA on q, k, v).
# decode: single-token `step` after an N-token prefill. layer: the whole mixer (projections
# included), forward + backward. train_step: a whole model's optimizer step (model_size).
# launches: what one block's training step dispatches, per kernel choice (counted, not timed).
MODES = ("fwd", "fwd_bwd", "decode", "layer", "train_step", "launches")
KERNEL_MODES = ("fwd", "fwd_bwd")
BASELINE = "sdpa"  # F.scaled_dot_product_attention(q, k, v, is_causal=True), in every run


@dataclass(frozen=True)
class Config:
    """One measurement: a subject (backend, baseline or anchor) at one length, dtype and mode."""

    subject: str
    kind: str  # backend | baseline | anchor
    mode: str
    dtype: str
    seq_len: int
    batch: int
    heads: int
    head_dim: int
    device: str
    warmup: int
    repeats: int
    decode_tokens: int
    prefill_chunk: int
    model_size: str
    memory_cap_mib: float | None
    threads: int | None
    cpu_allocator: str  # see longctx.bench.allocator
    seed: int
    options: Mapping[str, Any] = field(default_factory=dict)
    kernel: str = AUTO  # attention.kernel of a backend (longctx.ops.seam)

    @property
    def series(self) -> tuple[str, str, str, str, int | None]:
        """The line this point belongs to: one per subject, dtype, mode, kernel and threads."""
        return (self.subject, self.dtype, self.mode, self.kernel, self.threads)


@dataclass(frozen=True)
class Settings:
    subjects: list[tuple[str, str]]  # (name, kind), baseline first
    lengths: list[int]
    dtypes: list[str]
    modes: list[str]
    template: Config  # subject / mode / dtype / seq_len filled per configuration
    config_budget_s: float
    total_budget_s: float
    backend_options: Mapping[str, Mapping[str, Any]]  # attention options per backend name
    rounds: int = 1  # passes over every configuration (see run.measure_all)
    kernel: str = AUTO  # attention.kernel of every backend in the timed modes
    threads: tuple[int | None, ...] = (None,)  # torch threads of each pass; None: torch's default
    load: int = 0  # competing CPU-bound processes of the second, loaded timing (0: no such timing)

    def configs(self) -> list[Config]:
        """Every configuration, shortest lengths first so a spent total budget cuts the longest;
        at each length, every thread count in turn."""
        planned = []
        for seq_len in self.lengths:
            for threads in self.threads:
                for dtype in self.dtypes:
                    for mode in self.modes:
                        planned += [
                            dataclasses.replace(
                                self.template,
                                subject=name,
                                kind=kind,
                                mode=mode,
                                dtype=dtype,
                                seq_len=seq_len,
                                threads=threads,
                                options=self._options(name, kind, mode, seq_len),
                                kernel=kernel,
                            )
                            for name, kind in self.subjects
                            if kind == "backend" or mode in _NON_BACKEND_MODES[kind]
                            for kernel in self._kernels(name, kind, mode)
                        ]
        return planned

    def _kernels(self, name: str, kind: str, mode: str) -> tuple[str, ...]:
        """`launches` counts every kernel a backend lists; timed modes run the `kernel` setting."""
        if kind != "backend":
            return (AUTO,)
        if mode == "launches":
            return backend_class(name).kernels
        return (self.kernel,)

    def _options(self, name: str, kind: str, mode: str, seq_len: int) -> dict[str, Any]:
        """The given options; a backend with a `max_len` (its learned position table) left unset is
        sized to the positions this configuration runs, since the bench measures cost at N."""
        options = dict(self.backend_options.get(name, {}))
        if kind == "backend" and "max_len" not in options and _has_option(name, "max_len"):
            options["max_len"] = seq_len + (self.template.decode_tokens if mode == "decode" else 0)
        return options


# Which modes the non-backend subjects have: SDPA has a KV-cache decode; anchors are kernels only.
_NON_BACKEND_MODES = {"baseline": ("fwd", "fwd_bwd", "decode"), "anchor": KERNEL_MODES}


# Settings that are lists; on the command line each also takes one bare value (`backends=full`,
# `lengths=4096`), which Hydra parses as a string or a number rather than a list.
LIST_SETTINGS = ("backends", "anchors", "lengths", "dtypes", "modes")
MEMORY_LIST_SETTINGS = ("models", "backends", "lengths", "check_backends", "width_check")
ALL = "all"  # `backends: all`, the one bare value that is not a list of one


def bare_values_as_lists(settings: dict[str, Any]) -> dict[str, Any]:
    """The bench's settings with every bare value of a list setting made a list of one."""

    def listed(section: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
        return {
            key: [value]
            if key in keys and value is not None and value != ALL and not isinstance(value, list)
            else value
            for key, value in section.items()
        }

    settings = listed(settings, LIST_SETTINGS)
    if isinstance(settings.get("memory"), dict):
        settings["memory"] = listed(settings["memory"], MEMORY_LIST_SETTINGS)
    return settings


def _check_choices(values, valid, key: str) -> list:
    values = list(values)
    unknown = [v for v in values if v not in valid]
    if unknown or not values:
        raise ConfigError(f"{key}={values} is not valid; choose from {list(valid)}")
    return values


def _subjects(backends, anchors, missing_anchors) -> list[tuple[str, str]]:
    registered = available_backends()
    if backends == ALL:
        names = registered
    else:
        names = [
            name
            for name in _check_choices(backends, registered + [BASELINE], "backends")
            if name != BASELINE
        ]
    anchors = (
        [a for a in _check_choices(anchors, ANCHORS, "anchors") if a not in missing_anchors]
        if anchors
        else []
    )
    return (
        [(BASELINE, "baseline")]
        + [(n, "backend") for n in names]
        + [(a, "anchor") for a in anchors]
    )


def _threads(given) -> tuple[int | None, ...]:
    """`threads`: null (torch's default), a count, or a list of counts (one pass each)."""
    if given is None:
        return (None,)
    counts = list(given) if isinstance(given, (list, tuple)) else [given]
    if not counts or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in counts):
        raise ConfigError(
            f"threads={given} is not valid; give null (torch's default), a thread count such as "
            "2, or a list of counts such as [1,2]"
        )
    return tuple(dict.fromkeys(counts))


def _load(given) -> int:
    if isinstance(given, bool) or not isinstance(given, int) or given < 0:
        raise ConfigError(
            f"load={given} is not valid; give the number of competing CPU-bound processes to "
            "time under (0: idle timing only; 1: one competing process)"
        )
    return given


def _has_option(name: str, key: str) -> bool:
    return key in {f.name for f in dataclasses.fields(backend_class(name).Options)}


def _backend_options(given: Mapping | None) -> dict[str, dict[str, Any]]:
    """Per-backend option overrides, with names and keys checked against the Options dataclasses."""
    options = {name: dict(opts or {}) for name, opts in dict(given or {}).items()}
    for name, opts in options.items():
        valid = {f.name for f in dataclasses.fields(backend_class(name).Options)}
        if set(opts) - valid:
            raise ConfigError(
                f"options.{name} has unknown key(s) {sorted(set(opts) - valid)}; "
                f"valid: {sorted(valid)}"
            )
    return options


def settings_from_config(cfg: Mapping, missing_anchors: Mapping[str, str]) -> Settings:
    """Validate the Hydra config (all mistakes surface here, before anything is measured).

    Anchors named in `missing_anchors` (not importable here) are left out.
    """
    lengths = sorted(int(n) for n in cfg["lengths"])
    if not lengths or lengths[0] < 1:
        raise ConfigError(f"lengths={list(cfg['lengths'])} must be positive sequence lengths")
    for key in (
        "batch",
        "heads",
        "head_dim",
        "repeats",
        "decode_tokens",
        "prefill_chunk",
        "rounds",
    ):
        if int(cfg[key]) < 1:
            raise ConfigError(f"{key}={cfg[key]} must be at least 1")
    options = _backend_options(cfg["options"])
    threads = _threads(cfg["threads"])
    subjects = _subjects(cfg["backends"], cfg["anchors"], missing_anchors)
    template = Config(
        subject="",
        kind="",
        mode="",
        dtype="",
        seq_len=0,
        batch=int(cfg["batch"]),
        heads=int(cfg["heads"]),
        head_dim=int(cfg["head_dim"]),
        device=str(resolve_device(str(cfg["device"]))),
        warmup=int(cfg["warmup"]),
        repeats=int(cfg["repeats"]),
        decode_tokens=int(cfg["decode_tokens"]),
        prefill_chunk=int(cfg["prefill_chunk"]),
        model_size=str(cfg["model_size"]),
        memory_cap_mib=float(cfg["memory_cap_mib"]) if cfg["memory_cap_mib"] else None,
        threads=threads[0],  # Settings.configs sets each entry of `threads` in turn
        seed=int(cfg["seed"]),
        cpu_allocator=check_cpu_allocator(str(cfg["cpu_allocator"])),
    )
    return Settings(
        subjects=subjects,
        lengths=lengths,
        dtypes=_check_choices(cfg["dtypes"], DTYPES, "dtypes"),
        modes=_check_choices(cfg["modes"], MODES, "modes"),
        template=template,
        config_budget_s=float(cfg["config_budget_s"]),
        total_budget_s=float(cfg["total_budget_s"]),
        backend_options=options,
        rounds=int(cfg["rounds"]),
        kernel=_check_choices([cfg.get("kernel", AUTO)], KERNELS, "kernel")[0],
        threads=threads,
        load=_load(cfg.get("load", 0)),
    )
