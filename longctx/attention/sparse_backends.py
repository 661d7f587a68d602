"""The sparse softmax backends of docs/attention.md:
options, validation, and the pattern of each layer.

sliding_window, local, dilated, longformer, sparse_strided, sparse_fixed, blockwise. The
patterns themselves (predicate, layout, cache policy) are declared in sparse_patterns.py and
run by one engine (sparse_core.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from longctx.attention.registry import register
from longctx.attention.sparse_core import SparseBackend
from longctx.errors import ConfigError
from longctx.ops.sparse.patterns import (
    Component,
    FixedUnion,
    LayerPattern,
    LocalBlocks,
    ResidueClass,
    ShiftedBlock,
    StridedUnion,
    SummaryColumns,
    Window,
)

LAYOUTS = ("heads", "union", "layers")


def _int_option(backend: SparseBackend, key: str, minimum: int = 1) -> None:
    value = getattr(backend.options, key)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(
            f"attention={backend.name} needs an integer {key} >= {minimum}, got {value!r}"
        )


def _at_most_context(backend: SparseBackend, key: str, value: int | None = None) -> None:
    """A window/block/stride longer than the training context leaves nothing sparse: full attention
    under another name, which would silently mislabel a comparison."""
    value = getattr(backend.options, key) if value is None else value
    context = backend.dims.context_length
    if value > context:
        raise ConfigError(
            f"attention={backend.name} {key}={value} is longer than context_length={context}, "
            f"so every query sees its whole context; lower attention.{key} (or use attention=full)"
        )


def _sparse_transformer_layer(
    backend: SparseBackend, layer: int, first: Component, second: Component, union: Component
) -> LayerPattern:
    """layout heads: first half of the heads A1, the rest A2; union: A1 ∪ A2;
    layers: even A1, odd A2."""
    n_head, layout = backend.dims.n_head, backend.options.layout
    if layout == "union":
        return LayerPattern.uniform(n_head, union)
    if layout == "heads":
        return LayerPattern.split(n_head, [first, second])
    return LayerPattern.uniform(n_head, first if layer % 2 == 0 else second)


def _check_layout(backend: SparseBackend) -> None:
    layout = backend.options.layout
    if layout not in LAYOUTS:
        raise ConfigError(
            f"attention={backend.name} layout={layout!r} is unknown; choose one of {list(LAYOUTS)}"
        )
    if layout == "heads":
        backend.require_even_heads("layout=heads (first half of the heads A1, the rest A2)")


@register
class SlidingWindow(SparseBackend):
    """i - j < window (Longformer sliding window, Mistral)."""

    name = "sliding_window"

    @dataclass(frozen=True)
    class Options:
        window: int = 512

    def validate(self) -> None:
        _int_option(self, "window")
        _at_most_context(self, "window")

    def pattern(self, layer: int) -> LayerPattern:
        return LayerPattern.uniform(self.dims.n_head, Window(self.options.window))


@register
class LocalAttention(SparseBackend):
    """Liu et al. 2018: the query's block of block_size and look_back previous blocks."""

    name = "local"

    @dataclass(frozen=True)
    class Options:
        block_size: int = 256
        look_back: int = 0

    def validate(self) -> None:
        _int_option(self, "block_size")
        _int_option(self, "look_back", minimum=0)
        _at_most_context(self, "block_size")

    def pattern(self, layer: int) -> LayerPattern:
        return LayerPattern.uniform(
            self.dims.n_head, LocalBlocks(self.options.block_size, self.options.look_back)
        )


@register
class DilatedWindow(SparseBackend):
    """Longformer dilated sliding window:
    (i - j) mod dilation == 0 and (i - j) / dilation < window."""

    name = "dilated"

    @dataclass(frozen=True)
    class Options:
        window: int = 512
        dilation: int = 2

    def validate(self) -> None:
        _int_option(self, "window")
        _int_option(self, "dilation")
        _at_most_context(self, "window")

    def pattern(self, layer: int) -> LayerPattern:
        return LayerPattern.uniform(
            self.dims.n_head, Window(self.options.window, self.options.dilation)
        )


@register
class Longformer(SparseBackend):
    """Beltagy et al. 2020, causal: global first tokens, the last dilated_heads heads dilated."""

    name = "longformer"

    @dataclass(frozen=True)
    class Options:
        window: int = 512
        dilation: int = 2
        dilated_heads: int = 2
        global_tokens: int = 4
        layer_windows: tuple | None = None

        def __post_init__(self):  # a list from the config becomes a hashable tuple
            if self.layer_windows is not None and not isinstance(self.layer_windows, tuple):
                object.__setattr__(self, "layer_windows", tuple(self.layer_windows))

    def validate(self) -> None:
        for key in ("window", "dilation"):
            _int_option(self, key)
        for key in ("dilated_heads", "global_tokens"):
            _int_option(self, key, minimum=0)
        options, dims = self.options, self.dims
        if options.dilated_heads > dims.n_head:
            raise ConfigError(
                f"attention=longformer dilated_heads={options.dilated_heads} "
                f"exceeds model.n_head={dims.n_head}; lower attention.dilated_heads"
            )
        windows = options.layer_windows
        if windows is not None:
            if len(windows) != dims.n_layer:
                raise ConfigError(
                    f"attention=longformer layer_windows has {len(windows)} entries "
                    f"but model.n_layer={dims.n_layer}; give one window per layer "
                    "(or null to use attention.window everywhere)"
                )
            if any(not isinstance(w, int) or isinstance(w, bool) or w < 1 for w in windows):
                raise ConfigError(
                    f"attention=longformer layer_windows must be integers >= 1, got {list(windows)}"
                )
            for window in windows:
                _at_most_context(self, "layer_windows", window)
        else:
            _at_most_context(self, "window")

    def pattern(self, layer: int) -> LayerPattern:
        options, n_head = self.options, self.dims.n_head
        window = options.window if options.layer_windows is None else options.layer_windows[layer]
        plain = Window(window, 1, options.global_tokens)
        dilated = Window(window, options.dilation, options.global_tokens)
        n_dilated = options.dilated_heads
        if n_dilated == 0 or options.dilation == 1:
            return LayerPattern.uniform(n_head, plain)
        if n_dilated == n_head:
            return LayerPattern.uniform(n_head, dilated)
        return LayerPattern(
            n_head, ((0, n_head - n_dilated, plain), (n_head - n_dilated, n_head, dilated))
        )


@register
class SparseStrided(SparseBackend):
    """Child et al. 2019 strided: A1 i - j <= stride, A2 (i - j) mod stride == 0."""

    name = "sparse_strided"

    @dataclass(frozen=True)
    class Options:
        stride: int = 128
        layout: str = "heads"

    def validate(self) -> None:
        _int_option(self, "stride")
        _check_layout(self)
        _at_most_context(self, "stride")

    def pattern(self, layer: int) -> LayerPattern:
        stride = self.options.stride
        return _sparse_transformer_layer(
            self, layer, Window(stride + 1), ResidueClass(stride), StridedUnion(stride)
        )


@register
class SparseFixed(SparseBackend):
    """Child et al. 2019 fixed: A1 the query's block of stride,
    A2 the last `summary` columns of every block."""

    name = "sparse_fixed"

    @dataclass(frozen=True)
    class Options:
        stride: int = 128
        summary: int = 16
        layout: str = "heads"

    def validate(self) -> None:
        _int_option(self, "stride")
        _int_option(self, "summary")
        if self.options.summary > self.options.stride:
            raise ConfigError(
                f"attention=sparse_fixed summary={self.options.summary} "
                f"exceeds stride={self.options.stride}; "
                "the summary columns are the last `summary` positions of each block: "
                "lower attention.summary"
            )
        _check_layout(self)
        _at_most_context(self, "stride")

    def pattern(self, layer: int) -> LayerPattern:
        stride, summary = self.options.stride, self.options.summary
        return _sparse_transformer_layer(
            self,
            layer,
            LocalBlocks(stride),
            SummaryColumns(stride, summary),
            FixedUnion(stride, summary),
        )


@register
class Blockwise(SparseBackend):
    """Qiu et al. 2019, causal: head group k reads block b - shifts[k] (and each query itself)."""

    name = "blockwise"

    @dataclass(frozen=True)
    class Options:
        block_size: int = 256
        shifts: tuple = (0, 1)

        def __post_init__(self):  # a list from the config becomes a hashable tuple
            object.__setattr__(self, "shifts", tuple(self.shifts))

    def validate(self) -> None:
        _int_option(self, "block_size")
        shifts, n_head = self.options.shifts, self.dims.n_head
        if not shifts or any(
            not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in shifts
        ):
            raise ConfigError(
                "attention=blockwise shifts must be a non-empty list of integers >= 0, "
                f"got {list(shifts)}"
            )
        if n_head % len(shifts):
            raise ConfigError(
                f"attention=blockwise splits model.n_head={n_head} heads evenly "
                f"among {len(shifts)} shifts {list(shifts)}; "
                f"choose a head count divisible by {len(shifts)} or change attention.shifts"
            )
        _at_most_context(self, "block_size")

    def pattern(self, layer: int) -> LayerPattern:
        block = self.options.block_size
        groups = [
            LocalBlocks(block) if s == 0 else ShiftedBlock(block, s) for s in self.options.shifts
        ]
        return LayerPattern.split(self.dims.n_head, groups)
