"""Hybrid layer stacks: a cycle of backends over the layers
(e.g. linear layers with a window layer).

`pattern` is cycled over the layers; `backends` holds each named backend's options. Every
part is built through the registry as if it were selected alone, so a hybrid layer is exactly
its part's layer (validation, streaming state and MLP replacement included) and its state is
the per-layer composition of its parts' states.

`attention.kernel` may name any kernel one of the parts has: the parts that have it run it, the
others pick their own (`auto`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from longctx.attention.base import Backend, Mixer
from longctx.attention.registry import backend_class, register
from longctx.errors import ConfigError


@register
class HybridAttention(Backend):
    name = "hybrid"

    @dataclass(frozen=True)
    class Options:
        pattern: list = field(default_factory=lambda: ["linear", "linear", "sliding_window"])
        backends: dict = field(default_factory=dict)

    def validate(self) -> None:
        pattern = list(self.options.pattern)
        if not pattern:
            raise ConfigError(
                "attention=hybrid needs a non-empty pattern, e.g. pattern=[linear,sliding_window]"
            )
        if self.name in pattern:
            raise ConfigError(
                "attention=hybrid cannot contain itself; list concrete backends in pattern"
            )
        unused = sorted(set(self.options.backends) - set(pattern))
        if unused:
            raise ConfigError(
                f"attention.backends sets options for {unused}, which pattern {pattern} never uses"
            )

    @functools.cached_property
    def parts(self) -> dict[str, Backend]:
        """Each named part, built (and validated) through the registry as if selected alone."""
        parts = {}
        for name in dict.fromkeys(self.options.pattern):
            settings = dict(self.options.backends.get(name) or {})
            if self.kernel in backend_class(name).kernels:
                settings.setdefault("kernel", self.kernel)
            parts[name] = backend_class(name).from_config({"name": name, **settings}, self.dims)
        return parts

    def supported_kernels(self) -> tuple[str, ...]:
        kernels = (kernel for part in self.parts.values() for kernel in part.supported_kernels())
        return tuple(dict.fromkeys(kernels))

    def part(self, layer: int) -> Backend:
        """The backend that builds `layer`
        (it sees the global layer index, e.g. for per-layer windows)."""
        pattern = self.options.pattern
        return self.parts[pattern[layer % len(pattern)]]

    @property
    def ordered_stream(self) -> bool:  # type: ignore[override]
        return any(part.ordered_stream for part in self.parts.values())

    def mixer(self, layer: int) -> Mixer:
        return self.part(layer).mixer(layer)

    def ffn(self, layer: int) -> Mixer | None:
        return self.part(layer).ffn(layer)

    @property
    def max_len(self) -> int | None:
        limits = [part.max_len for part in self.parts.values() if part.max_len is not None]
        return min(limits) if limits else None

    def attention_flops(self, seq_len: int) -> float:
        """Mean over the layers of the model (the MFU counter multiplies by n_layer)."""
        layers = range(self.dims.n_layer)
        return (
            sum(self.part(layer).attention_flops(seq_len) for layer in layers) / self.dims.n_layer
        )
