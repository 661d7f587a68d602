"""`python -m longctx.bench mode=memory`: the bytes autograd keeps for the backward pass.

For each model preset and backend: the bytes one block saves for its backward pass, per token,
with activation checkpointing off and on; and what the head and the loss save per token, with
the chunked loss of training and with the plain loss it replaced. memory_plan.py turns them
into "does a run fit in a GPU" answers.

How it counts. A forward pass runs under torch.autograd.graph.saved_tensors_hooks; every tensor
autograd saves is attributed to the storage it lives in, and each storage counts once with its
full size: views (q, k, v cut from one fused projection, a transpose, a slice) share their
base's storage, so they cost what the base costs, however many of them are saved. Storages of
parameters and buffers are left out (they exist anyway). Saved tensors computed from parameters
alone (autocast's bf16 copies of the weights, decays computed from learned rates) are counted
apart as `weight_copies`: they do not grow with the tokens. Everything else is an activation.
A checkpointed block shows up as what the checkpoint itself saves: its inputs.

What is measured. Real blocks (build_block), run on the CPU under the precision training uses
(bf16-mixed: autocast, as trainer=gpu), at a few sequence lengths; one block per distinct block
layout (a hybrid's pattern, alternating layers), weighted by how many of the preset's blocks
share it. Backends that train on ordered streams are measured as they train: continuing a state
carried from the previous batch. Per token per block the bytes are fitted as a + b*N from the
two lengths (b > 0 where something quadratic is kept), and the fit is checked against a third,
longer length on the first preset for the backends of `memory.check_backends`. Presets listed
in `memory.scaled` are measured at fractions of their width and extrapolated to full width
(extrapolate_width), which a CPU can afford for a 2048-wide model; the backends of
`memory.width_check` are also measured at full width, as a check. The CPU runs the torch
kernels; a GPU's fused kernels (FlexAttention, flash-linear-attention) may keep less: re-run
this mode on the GPU to measure those.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra import compose
from torch import Tensor, nn

from longctx.attention import available_backends
from longctx.bench import memory_plan
from longctx.bench.environment import describe
from longctx.bench.memory_plan import CHECKPOINTING, predicted_per_token
from longctx.core.files import atomic_write_text
from longctx.core.state import map_state
from longctx.errors import ConfigError
from longctx.model import build_block, build_model
from longctx.model.layers import NORMS
from longctx.model.lm import Block, carry_over
from longctx.model.loss import chunked_cross_entropy

log = logging.getLogger("longctx.bench")

PRECISIONS = ("bf16-mixed", "32-true")


@dataclass
class SavedBytes:
    """Unique storages autograd saved: activations, and copies computed from parameters only."""

    activations: int = 0
    weight_copies: int = 0


class SavedTensorCounter:
    """Counts what autograd saves inside the `with` block (see the module's docstring)."""

    def __init__(self, module: nn.Module):
        self._excluded = {
            t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]
        }
        self._parameters = set(module.parameters())
        self._seen: dict[int, Tensor] = {}  # holds each storage alive: no address is reused
        self.saved = SavedBytes()

    def hold(self, tensors: list[Tensor]) -> None:
        """Count tensors kept for backward by other means than saving (a checkpoint keeps the
        nested inputs of its function, such as a carried state, in its closure)."""
        for tensor in tensors:
            self._pack(tensor)

    def _pack(self, tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        address = storage.data_ptr()
        if address in self._excluded or address in self._seen:
            return tensor
        self._seen[address] = tensor
        if self._from_parameters_only(tensor):
            self.saved.weight_copies += storage.nbytes()
        else:
            self.saved.activations += storage.nbytes()
        return tensor

    def _from_parameters_only(self, tensor: Tensor) -> bool:
        """True when every input the tensor's autograd history reaches is a parameter."""
        if tensor.grad_fn is None:
            return False  # an input, or a constant such as a mask (those may grow with N)
        pending, visited = [tensor.grad_fn], set()
        while pending:
            node = pending.pop()
            if node is None or node in visited:
                continue
            visited.add(node)
            variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf
            if variable is not None and variable not in self._parameters:
                return False
            pending.extend(next_node for next_node, _ in node.next_functions)
        return True

    @contextlib.contextmanager
    def counting(self) -> Iterator[SavedBytes]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor):
            yield self.saved


def _autocast(precision: str):
    if precision not in PRECISIONS:
        raise ConfigError(f"memory.precision={precision!r} is not valid; choose from {PRECISIONS}")
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed")


def block_layout(block: Block) -> str:
    """Blocks with equal layouts save the same bytes: classes, settings and tensor shapes.

    Settings are every attribute a module holds besides its submodules and tensors, by repr; an
    object whose repr is its address makes its block unique, so it is measured on its own.
    """
    parts = []
    for name, module in block.named_modules():
        settings = sorted(
            (key, repr(value))
            for key, value in vars(module).items()
            if not key.startswith("_") and key != "training"
        )
        shapes = [
            (key, tuple(t.shape), str(t.dtype))
            for key, t in [
                *module.named_parameters(recurse=False),
                *module.named_buffers(recurse=False),
            ]
        ]
        parts.append((name, type(module).__qualname__, settings, shapes))
    return repr(parts)


def distinct_layers(cfg: Mapping) -> dict[int, int]:
    """One layer index per distinct block layout of the model, with how many blocks share it."""
    with torch.device("meta"):
        model = build_model(cfg, 2)
    layouts = [block_layout(block) for block in model.blocks]
    counts = Counter(layouts)
    return {layouts.index(layout): count for layout, count in counts.items()}


def measure_block(
    block: Block, seq_len: int, batch: int, precision: str, ordered_stream: bool
) -> SavedBytes:
    """What `block` saves for a training forward over `seq_len` tokens (see the docstring)."""
    width = block.norm_mixer.normalized_shape[0]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, seq_len, width, generator=generator, requires_grad=True)
    counter = SavedTensorCounter(block)
    with _autocast(precision):
        if ordered_stream:
            with torch.no_grad():  # the state the previous batch left, as training carries it
                previous = torch.randn(batch, seq_len, width, generator=generator)
                state = carry_over(block(previous, None, 0)[1])
            with counter.counting():
                output = block(x, state, seq_len)
            if block.checkpointed:
                held: list[Tensor] = []
                map_state(held.append, state)
                counter.hold(held)
        else:
            with counter.counting():
                output = block(x)
    del output
    return counter.saved


def measure_model_blocks(
    cfg: Mapping, lengths: list[int], batch: int, precision: str, ordered_stream: bool
) -> list[dict[str, Any]]:
    """Per length and checkpointing setting: the bytes per block averaged over the model's
    blocks (each distinct layout measured once, weighted by its number of blocks)."""
    layers = distinct_layers(cfg)
    n_layer = sum(layers.values())
    totals = {(n, setting): SavedBytes() for n in lengths for setting in CHECKPOINTING}
    for layer, count in layers.items():
        torch.manual_seed(0)
        block = build_block(cfg, layer)
        for n in lengths:
            for setting in CHECKPOINTING:
                block.checkpointed = setting == "blocks"
                saved = measure_block(block, n, batch, precision, ordered_stream)
                total = totals[(n, setting)]
                total.activations += count * saved.activations
                total.weight_copies += count * saved.weight_copies
        del block
    return [
        {
            "seq_len": n,
            "checkpointing": setting,
            "layers_measured": sorted(layers),
            "activation_bytes_per_block": total.activations / n_layer,
            "weight_copy_bytes_per_block": total.weight_copies / n_layer,
            "bytes_per_token_per_block": total.activations / n_layer / (batch * n),
        }
        for (n, setting), total in totals.items()
    ]


def measure_loss(
    d_model: int, vocab_size: int, tokens: int, precision: str, norm: type[nn.Module]
) -> dict[str, float]:
    """Bytes per token the final norm, the head and the loss save: chunked and plain."""
    norm_layer, head = norm(d_model), nn.Linear(d_model, vocab_size, bias=False)
    module = nn.ModuleList([norm_layer, head])
    hidden = torch.randn(1, tokens, d_model, requires_grad=True)
    targets = torch.randint(0, vocab_size, (1, tokens))

    def plain() -> Tensor:
        logits = head(norm_layer(hidden))
        return nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    def chunked() -> Tensor:
        return chunked_cross_entropy(norm_layer(hidden), head, targets)

    result = {}
    for name, loss_fn in (("chunked", chunked), ("plain", plain)):
        counter = SavedTensorCounter(module)
        with _autocast(precision), counter.counting():
            loss = loss_fn()
        del loss
        result[f"{name}_loss_bytes_per_token"] = counter.saved.activations / tokens
    return result


def fit_per_token(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per checkpointing setting: bytes per token per block = a + b*N through the two shortest
    lengths (b is clamped at 0: noise must not predict less memory at longer lengths)."""
    fitted = {}
    for setting in CHECKPOINTING:
        points = sorted(
            (row["seq_len"], row["bytes_per_token_per_block"])
            for row in rows
            if row["checkpointing"] == setting
        )[:2]
        (n1, p1), (n2, p2) = points
        slope = max(0.0, (p2 - p1) / (n2 - n1))
        fitted[setting] = {"a": p2 - slope * n2, "b": slope}
    return fitted


def _line_at_one(points: list[tuple[float, float]]) -> float:
    """The value at 1 of the line through two (x, y) points."""
    (x1, y1), (x2, y2) = points
    return y1 + (1 - x1) * (y2 - y1) / (x2 - x1)


def narrower(cfg, scale: float):
    """`cfg` with d_model, n_head and mlp_hidden times `scale` (head_dim unchanged)."""
    model = cfg.model
    sizes = {"d_model": model.d_model, "n_head": model.n_head}
    if model.get("mlp_hidden"):
        sizes["mlp_hidden"] = model.mlp_hidden
    narrow = copy.deepcopy(cfg)
    for key, size in sizes.items():
        if (size * scale) % 1 or size * scale < 1:
            raise ConfigError(
                f"memory.scaled: model.{key}={size} times {scale} is not a whole number; "
                "use fractions such as 1/8 and 1/4 that divide the model's widths"
            )
        narrow.model[key] = int(size * scale)
    return narrow


def extrapolate_width(by_scale: Mapping[float, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Full-width rows from rows measured at two width fractions s.

    Every tensor a block saves per token is as wide as d_model, the MLP's hidden layer or the
    heads (all proportional to s at a fixed head_dim), or has no width at all (norm statistics,
    masks, positions): activations are a + b*s, taken at s = 1. Weight copies are c*s^2 + d*s
    (matrices, and vectors such as biases): copies / s is linear in s.
    """
    (s1, rows1), (s2, rows2) = sorted(by_scale.items())
    extrapolated = []
    for row1, row2 in zip(rows1, rows2):
        row = dict(row1)
        for key in ("activation_bytes_per_block", "bytes_per_token_per_block"):
            row[key] = _line_at_one([(s1, row1[key]), (s2, row2[key])])
        copies = [(s, r["weight_copy_bytes_per_block"] / s) for s, r in ((s1, row1), (s2, row2))]
        row["weight_copy_bytes_per_block"] = _line_at_one(copies)
        extrapolated.append(row)
    return extrapolated


def measure_preset(model: str, backend: str, settings: Mapping, lengths: list[int]) -> dict:
    """One (preset, backend): measured at full width, or at the fractions of its width that
    `memory.scaled` lists and extrapolated (then checked at full width for the backends of
    `memory.width_check`)."""
    cfg = compose(
        config_name="train",
        overrides=[f"model={model}", f"attention={backend}", f"context_length={max(lengths)}"],
    )
    options = dict(settings.get("options", {}).get(backend) or {})
    for key, value in options.items():
        cfg.attention[key] = value
    with torch.device("meta"):
        meta = build_model(cfg, settings["vocab_size"])
    ordered = meta.backend.ordered_stream
    batch, precision = settings["batch"], settings["precision"]
    scales = list(settings.get("scaled", {}).get(model) or [])
    entry = {
        "model": model,
        "backend": backend,
        "options": options,
        "n_layer": meta.dims.n_layer,
        "d_model": meta.dims.d_model,
        "parameters": sum(p.numel() for p in meta.parameters()),
        "block_parameters": sum(p.numel() for p in meta.blocks.parameters()) / meta.dims.n_layer,
        "width_scales": scales or [1],
    }
    if scales:
        by_scale = {
            scale: measure_model_blocks(narrower(cfg, scale), lengths, batch, precision, ordered)
            for scale in scales
        }
        entry["rows"] = extrapolate_width(by_scale)
        entry["rows_by_width_scale"] = {str(scale): rows for scale, rows in by_scale.items()}
        if backend in settings.get("width_check", []):
            measured = measure_model_blocks(cfg, lengths, batch, precision, ordered)
            entry["width_check"] = [
                {
                    "seq_len": real["seq_len"],
                    "checkpointing": real["checkpointing"],
                    "measured": real["bytes_per_token_per_block"],
                    "extrapolated": guess["bytes_per_token_per_block"],
                    "relative_error": guess["bytes_per_token_per_block"]
                    / real["bytes_per_token_per_block"]
                    - 1,
                    "weight_copies_measured": real["weight_copy_bytes_per_block"],
                    "weight_copies_extrapolated": guess["weight_copy_bytes_per_block"],
                }
                for real, guess in zip(measured, entry["rows"])
            ]
    else:
        entry["rows"] = measure_model_blocks(cfg, lengths, batch, precision, ordered)
    entry["fit"] = fit_per_token(entry["rows"])
    return entry


def memory_settings(cfg: Mapping) -> dict[str, Any]:
    settings = dict(cfg["memory"])
    names = available_backends() if settings["backends"] == "all" else list(settings["backends"])
    unknown = sorted(set(names) - set(available_backends()))
    if unknown:
        raise ConfigError(
            f"memory.backends has unknown name(s) {unknown}; choose from {available_backends()}"
        )
    lengths = sorted(int(n) for n in settings["lengths"])
    if len(lengths) < 2 or lengths[0] < 1:
        raise ConfigError(
            f"memory.lengths={lengths} needs two positive lengths (the fit a + b*N needs both)"
        )
    _autocast(settings["precision"])  # validates it
    return {**settings, "backends": names, "lengths": lengths, "models": list(settings["models"])}


def run_memory(cfg: Mapping, out_dir: Path) -> dict[str, Any]:
    """Measure every (preset, backend); write memory.json and memory.md into out_dir as it goes."""
    settings = memory_settings(cfg)
    result = {
        "settings": settings,
        "environment": describe("cpu", None),
        "presets": [],
        "loss": [],
        "scaling_check": [],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    for index, model in enumerate(settings["models"]):
        for backend in settings["backends"]:
            check = settings.get("check_length") if index == 0 else None
            check = check if backend in settings.get("check_backends", []) else None
            lengths = settings["lengths"] + ([int(check)] if check else [])
            measured = measure_preset(model, backend, settings, lengths)
            result["presets"].append(measured)
            if check:
                result["scaling_check"].append(scaling_check(measured, int(check)))
            log.info("memory: %s", memory_plan.summary_line(measured))
            _write(out_dir, result)
        preset = result["presets"][-1]
        result["loss"].append(
            {
                "model": model,
                "vocab_size": settings["vocab_size"],
                **measure_loss(
                    preset["d_model"],
                    settings["vocab_size"],
                    settings["loss_tokens"],
                    settings["precision"],
                    _norm_class(model),
                ),
            }
        )
        _write(out_dir, result)
    log.info("wrote memory.json and memory.md to %s", out_dir)
    return result


def scaling_check(measured: Mapping, seq_len: int) -> dict[str, Any]:
    """The fit through the two shorter lengths against the measurement at `seq_len`."""
    check = {"model": measured["model"], "backend": measured["backend"], "seq_len": seq_len}
    for row in measured["rows"]:
        if row["seq_len"] == seq_len:
            predicted = predicted_per_token(measured["fit"][row["checkpointing"]], seq_len)
            measured_value = row["bytes_per_token_per_block"]
            check[row["checkpointing"]] = {
                "measured": measured_value,
                "predicted": predicted,
                "relative_error": (predicted - measured_value) / measured_value,
            }
    return check


def _norm_class(model: str) -> type[nn.Module]:
    cfg = compose(config_name="train", overrides=[f"model={model}"])
    return NORMS[cfg.model.get("norm", "layernorm")]


def _write(out_dir: Path, result: Mapping) -> None:
    atomic_write_text(out_dir / "memory.json", memory_plan.to_json(result))
    atomic_write_text(out_dir / "memory.md", memory_plan.markdown(result))
