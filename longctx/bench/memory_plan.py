"""Does a training run fit in a GPU's memory, and with which options: from measured bytes.

`python -m longctx.bench mode=plan plan.model=llama_1b plan.attention=full
plan.context_length=32768 plan.gpu_memory_gib=80 plan.gpus=8` prints, for every combination
of activation checkpointing, sharding and micro-batch size, the estimated memory of one GPU and
whether it fits, from the bytes `mode=memory` measured (memory.py; plan.measured names its
memory.json).

The estimate of one GPU, in bytes:
- states: 16 per parameter (fp32 weights, fp32 gradients, AdamW's two fp32 moments), divided
  over the GPUs under FSDP, which then also holds two blocks' gathered fp32 weights (the one
  running and the one prefetched) and the gathered root (embeddings, head);
- weight copies: autocast's bf16 copies that blocks save for backward (measured per block): every
  block's without checkpointing, one block's with it (the copies are made again when a block
  is recomputed);
- activations: per block, B x N x the measured bytes per token at N, checkpointed blocks with
  their own (smaller) figure; with any block checkpointed, plus one block's full activations
  (the block being recomputed during the backward pass);
- loss: the chunked loss's bytes per token (final norm and head inputs) plus one chunk's logits
  in bf16, fp32 and their gradient;
- reserve: 10% of the GPU for what counting saved tensors does not see: the CUDA context, the
  allocator's fragmentation and kernels' temporary buffers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longctx.errors import ConfigError
from longctx.model.loss import LOGITS_PER_CHUNK

GIB = 2**30
CHECKPOINTING = ("none", "blocks")
# Least recomputation first: the planner recommends the first setting that fits.
CHECKPOINT_CHOICES = ("none", "every_2", "blocks")
STATE_BYTES_PER_PARAMETER = 16
GATHERED_BYTES_PER_PARAMETER = 4
RESERVE_FRACTION = 0.10
# One chunk of the loss: its logits in bf16 and in fp32, and the fp32 gradient of the latter.
CHUNK_BYTES = LOGITS_PER_CHUNK * (2 + 4 + 4)


def predicted_per_token(fit: Mapping[str, float], seq_len: int) -> float:
    """Bytes per token per block at seq_len from the fit a + b*N (memory.fit_per_token)."""
    return fit["a"] + fit["b"] * seq_len


@dataclass(frozen=True)
class Options:
    checkpointing: str  # none | every_2 | blocks
    fsdp_gpus: int  # 1 = every GPU holds everything (one GPU, or DDP)
    batch_size: int  # per GPU (the micro-batch; accumulate to keep the global batch)

    def describe(self) -> str:
        sharding = f"FSDP over {self.fsdp_gpus}" if self.fsdp_gpus > 1 else "no sharding"
        return (
            f"activation_checkpointing={self.checkpointing}, {sharding}, "
            f"batch_size={self.batch_size}"
        )


@dataclass(frozen=True)
class Estimate:
    states: float
    weight_copies: float
    activations: float
    loss: float
    reserve: float

    @property
    def total(self) -> float:
        return self.states + self.weight_copies + self.activations + self.loss + self.reserve


def _checkpointed_count(setting: str, n_layer: int) -> int:
    if setting == "none":
        return 0
    if setting == "blocks":
        return n_layer
    return math.ceil(n_layer / int(setting.removeprefix("every_")))


def _weight_copies_per_block(preset: Mapping) -> float:
    return max(
        row["weight_copy_bytes_per_block"]
        for row in preset["rows"]
        if row["checkpointing"] == "none"
    )


def estimate(
    preset: Mapping,
    loss_bytes_per_token: float,
    seq_len: int,
    options: Options,
    gpu_memory_bytes: float,
) -> Estimate:
    """One GPU's memory for a training step of `preset` (a memory.json entry) with `options`."""
    n_layer = preset["n_layer"]
    parameters, block_parameters = preset["parameters"], preset["block_parameters"]
    states = parameters * STATE_BYTES_PER_PARAMETER / options.fsdp_gpus
    if options.fsdp_gpus > 1:
        root = parameters - n_layer * block_parameters
        states += (2 * block_parameters + root) * GATHERED_BYTES_PER_PARAMETER
    checkpointed = _checkpointed_count(options.checkpointing, n_layer)
    tokens = options.batch_size * seq_len
    full = tokens * predicted_per_token(preset["fit"]["none"], seq_len)
    kept = tokens * predicted_per_token(preset["fit"]["blocks"], seq_len)
    # With any block checkpointed, one block at a time is recomputed in full during backward.
    recomputed = 1 if checkpointed else 0
    activations = (n_layer - checkpointed + recomputed) * full + checkpointed * kept
    copies = _weight_copies_per_block(preset) * (n_layer - checkpointed + recomputed)
    loss = tokens * loss_bytes_per_token + CHUNK_BYTES
    return Estimate(states, copies, activations, loss, RESERVE_FRACTION * gpu_memory_bytes)


def option_grid(batch_size: int, gpus: int) -> Iterator[Options]:
    """In the planner's order of preference: least recomputation, then no sharding, then the
    largest micro-batch (halving down to 1)."""
    batches = []
    while batch_size >= 1:
        batches.append(batch_size)
        batch_size //= 2
    for checkpointing in CHECKPOINT_CHOICES:
        for fsdp_gpus in sorted({1, gpus}):
            for batch in batches:
                yield Options(checkpointing, fsdp_gpus, batch)


def plan(
    preset: Mapping,
    loss_bytes_per_token: float,
    seq_len: int,
    batch_size: int,
    gpus: int,
    gpu_memory_gib: float,
) -> list[tuple[Options, Estimate]]:
    memory = gpu_memory_gib * GIB
    return [
        (options, estimate(preset, loss_bytes_per_token, seq_len, options, memory))
        for options in option_grid(batch_size, gpus)
    ]


def first_fit(planned: list[tuple[Options, Estimate]], gpu_memory_gib: float) -> Options | None:
    for options, guess in planned:
        if guess.total <= gpu_memory_gib * GIB:
            return options
    return None


def longest_context(
    preset: Mapping,
    loss_bytes_per_token: float,
    options: Options,
    gpu_memory_gib: float,
    step: int = 1024,
    limit: int = 2**24,
) -> int:
    """The longest multiple of `step` tokens (up to `limit`) that fits; 0 when none does."""
    memory = gpu_memory_gib * GIB

    def fits(n: int) -> bool:
        return estimate(preset, loss_bytes_per_token, n, options, memory).total <= memory

    low, high = 0, limit // step  # fits(low * step) holds (vacuously at 0)
    if fits(high * step):
        return high * step
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle * step) else (low, middle)
    return low * step


# --- reading and writing measurements ------------------------------------------------------------


def find_preset(result: Mapping, model: str, backend: str) -> tuple[Mapping, float]:
    """The measured entry of (model, backend) and the chunked loss's bytes per token."""
    presets = [p for p in result["presets"] if p["model"] == model and p["backend"] == backend]
    losses = [row for row in result["loss"] if row["model"] == model]
    if not presets or not losses:
        raise ConfigError(
            f"no measurement of model={model} attention={backend} in plan.measured; measure it "
            f"with python -m longctx.bench mode=memory memory.models=[{model}] "
            f"memory.backends=[{backend}] and pass that run's memory.json as plan.measured"
        )
    return presets[0], losses[0]["chunked_loss_bytes_per_token"]


def load_measurements(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"plan.measured={str(path)!r} is not a file; give the memory.json that "
            "`python -m longctx.bench mode=memory` wrote"
        )
    return json.loads(path.read_text())


def to_json(result: Mapping) -> str:
    return json.dumps(result, indent=2, default=str)


def _kib(value: float) -> str:
    return f"{value / 1024:.1f}"


def _gib(value: float) -> str:
    return f"{value / GIB:.1f}"


def _tokens(n: int) -> str:
    if not n:
        return "-"
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def summary_line(preset: Mapping) -> str:
    longest = max(row["seq_len"] for row in preset["rows"])
    per_token = {
        row["checkpointing"]: row["bytes_per_token_per_block"]
        for row in preset["rows"]
        if row["seq_len"] == longest
    }
    return (
        f"{preset['model']} {preset['backend']}: {_kib(per_token['none'])} KiB per token per "
        f"block at N={longest}, {_kib(per_token['blocks'])} with activation_checkpointing=blocks"
    )


def markdown(result: Mapping) -> str:
    """The measured table, the scaling check and, per preset, what fits in a GPU."""
    settings = result["settings"]
    lines = [
        "# Saved-activation bytes per token per block",
        "",
        f"Measured with `python -m longctx.bench mode=memory` ({settings['precision']}, batch "
        f"{settings['batch']}, lengths {settings['lengths']}); see longctx/bench/memory.py for "
        "how tensors are counted (unique storages; views count once) and memory_plan.py for "
        "the estimate.",
        "",
        "| model | backend | layers measured | N | KiB/token/block, none | KiB/token/block, "
        "blocks | b (bytes/token/block per token of N) | weight copies MiB/block |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for preset in result["presets"]:
        for n in sorted({row["seq_len"] for row in preset["rows"]}):
            rows = {r["checkpointing"]: r for r in preset["rows"] if r["seq_len"] == n}
            lines.append(
                f"| {preset['model']} | {preset['backend']} | {rows['none']['layers_measured']} "
                f"| {n} | {_kib(rows['none']['bytes_per_token_per_block'])} "
                f"| {_kib(rows['blocks']['bytes_per_token_per_block'])} "
                f"| {preset['fit']['none']['b']:.3g} "
                f"| {rows['none']['weight_copy_bytes_per_block'] / 2**20:.1f} |"
            )
    if result["loss"]:
        lines += [
            "",
            "## Final norm, head and loss",
            "",
            "| model | vocab | chunked loss, bytes/token | plain loss, bytes/token |",
            "|---|---|---|---|",
        ]
        for row in result["loss"]:
            lines.append(
                f"| {row['model']} | {row['vocab_size']} | "
                f"{row['chunked_loss_bytes_per_token']:.0f} | "
                f"{row['plain_loss_bytes_per_token']:.0f} |"
            )
    if result["scaling_check"]:
        lines += [
            "",
            "## The fit a + b*N against a longer measured length",
            "",
            "| model | backend | N | measured KiB, none | fit KiB, none | error | measured KiB, "
            "blocks | fit KiB, blocks | error |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for check in result["scaling_check"]:
            cells = []
            for setting in CHECKPOINTING:
                entry = check[setting]
                cells += [
                    _kib(entry["measured"]),
                    _kib(entry["predicted"]),
                    f"{100 * entry['relative_error']:+.1f}%",
                ]
            lines.append(
                f"| {check['model']} | {check['backend']} | {check['seq_len']} | "
                + " | ".join(cells)
                + " |"
            )
    checked = [p for p in result["presets"] if p.get("width_check")]
    if checked:
        lines += [
            "",
            "## Width extrapolation against a full-width measurement",
            "",
            "| model | backend | N | checkpointing | measured KiB | extrapolated KiB | error | "
            "weight copies measured MiB | extrapolated MiB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for preset in checked:
            for row in preset["width_check"]:
                lines.append(
                    f"| {preset['model']} | {preset['backend']} | {row['seq_len']} | "
                    f"{row['checkpointing']} | {_kib(row['measured'])} | "
                    f"{_kib(row['extrapolated'])} | {100 * row['relative_error']:+.1f}% | "
                    f"{row['weight_copies_measured'] / 2**20:.1f} | "
                    f"{row['weight_copies_extrapolated'] / 2**20:.1f} |"
                )
    for model in dict.fromkeys(p["model"] for p in result["presets"]):
        if any(row["model"] == model for row in result["loss"]):
            lines += ["", *fit_table(result, model, settings)]
    return "\n".join(lines) + "\n"


def fit_table(result: Mapping, model: str, settings: Mapping) -> list[str]:
    """Per backend: activations at the first planned length, the cheapest options that fit at
    each planned length, and the longest context one GPU holds without and with checkpointing."""
    lengths = [int(n) for n in settings["plan_lengths"]]
    gpu, gpus = float(settings["gpu_memory_gib"]), int(settings["plan_gpus"])
    first = lengths[0]
    lines = [
        f"## {model} in {gpu:g} GiB per GPU (batch 1 per GPU; FSDP over up to {gpus} GPUs)",
        "",
        f"| backend | activations at {_tokens(first)}, none -> blocks (GiB) | "
        + " | ".join(f"cheapest fit at {_tokens(n)}" for n in lengths)
        + " | longest context, 1 GPU: none / blocks | "
        + f"FSDP over {gpus}: none / blocks |",
        "|---|---|" + "---|" * len(lengths) + "---|---|",
    ]
    for preset in (p for p in result["presets"] if p["model"] == model):
        preset, loss = find_preset(result, model, preset["backend"])
        one = {setting: Options(setting, 1, 1) for setting in CHECKPOINTING}
        activations = {
            setting: estimate(preset, loss, first, one[setting], gpu * GIB).activations
            for setting in CHECKPOINTING
        }
        cheapest = []
        for n in lengths:
            found = first_fit(plan(preset, loss, n, 1, gpus, gpu), gpu)
            cheapest.append(_short(found) if found else "does not fit")
        longest = [
            _tokens(longest_context(preset, loss, Options(setting, fsdp, 1), gpu))
            for fsdp in (1, gpus)
            for setting in CHECKPOINTING
        ]
        lines.append(
            f"| {preset['backend']} | {_gib(activations['none'])} -> "
            f"{_gib(activations['blocks'])} | "
            + " | ".join(cheapest)
            + f" | {longest[0]} / {longest[1]} | {longest[2]} / {longest[3]} |"
        )
    return lines


def _short(options: Options) -> str:
    parts = [] if options.checkpointing == "none" else [f"ckpt {options.checkpointing}"]
    if options.fsdp_gpus > 1:
        parts.append(f"FSDP {options.fsdp_gpus}")
    return " + ".join(parts) or "as is"


def run_plan(cfg: Mapping) -> list[str]:
    """mode=plan: the lines it prints (the estimate of every option, and the recommendation)."""
    settings = cfg["plan"]
    result = load_measurements(settings["measured"])
    preset, loss = find_preset(result, settings["model"], settings["attention"])
    seq_len, gpu = int(settings["context_length"]), float(settings["gpu_memory_gib"])
    planned = plan(preset, loss, seq_len, int(settings["batch_size"]), int(settings["gpus"]), gpu)
    lines = [
        f"model={settings['model']} attention={settings['attention']} "
        f"context_length={seq_len}, {gpu:g} GiB per GPU, {settings['gpus']} GPU(s):",
        "  GiB: states + weight copies + activations + loss + reserve = total",
    ]
    for options, guess in planned:
        terms = " + ".join(
            _gib(getattr(guess, name))
            for name in ("states", "weight_copies", "activations", "loss", "reserve")
        )
        verdict = "fits" if guess.total <= gpu * GIB else "does not fit"
        lines.append(f"  {options.describe()}: {terms} = {_gib(guess.total)}: {verdict}")
    found = first_fit(planned, gpu)
    lines.append(
        f"use {found.describe()}"
        if found
        else "no option fits: use more GPUs, a GPU with more memory or a shorter context"
    )
    return lines
