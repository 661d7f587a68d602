"""The contract every attention backend meets.

A *backend* (one per `attention=<name>`) turns its config section into per-layer modules.
The model asks it for a token mixer (and optionally a replacement for the MLP) per layer
and never looks at the backend's name.

A *mixer* is a causal sequence layer with two forms that must agree:
- `forward(x)`: a whole sequence at positions 0..N-1 with fresh state (training, eval);
- `init_state(batch)` / `step(x, state, start)`: streaming, where `x` holds the tokens at
  positions start..start+n-1 and `state` carries whatever earlier tokens left behind.
States are nested tuples/lists/dicts of tensors; `step` returns a new state and never
mutates the one it was given, so a caller may branch from a saved state.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from longctx.errors import ConfigError
from longctx.ops.seam import AUTO, TORCH, check_kernel_choice

State = Any  # nested tuple / list / dict of tensors


@dataclass(frozen=True)
class ModelSettings:
    """The model-level settings a backend builds its layers from: sizes, the positional scheme,
    bias and dropout."""

    n_layer: int
    n_head: int
    d_model: int
    context_length: int
    position: str = "rope"  # rope | alibi | learned | none
    rope_base: float = 10000.0
    bias: bool = False
    dropout: float = 0.0

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


class Mixer(nn.Module, ABC):
    """A causal sequence-mixing layer (attention, recurrence, or a stateful MLP replacement).

    Token mixers also split `forward` into `project(x) -> tuple of tensors` (the per-token
    projections) and `mix(*tensors) -> Tensor` (the mechanism's own kernel across positions),
    with forward(x) == output projection of mix(*project(x)). The bench module times `mix`
    side by side with SDPA on the same shapes.
    """

    @abstractmethod
    def forward(self, x: Tensor) -> Tensor:
        """[B, N, D] -> [B, N, D], causal, from a fresh state."""

    @abstractmethod
    def init_state(self, batch_size: int) -> State:
        """The streaming state before any token."""

    @abstractmethod
    def step(self, x: Tensor, state: State, start: int) -> tuple[Tensor, State]:
        """Outputs for positions start.. of x given the state, and the state after them."""

    def init_weights(self, n_layer: int) -> None:
        """Called after the model's default normal init; override for mechanism-specific init."""

    def prepare(self, seq_len: int, device: torch.device) -> None:
        """Build what the kernel caches per sequence length (FlexAttention's BlockMasks) before
        `forward` runs: called outside compiled regions, so a compiled block reads the cache
        as inputs instead of tracing its construction into every step."""


class HeadMixer(Mixer):
    """A token mixer over heads: forward(x) = out(heads merged back(mix(*project(x)))).

    Subclasses define `project`, `mix` and the output projection `self.out`, which starts GPT-2
    style: scaled down with depth so the residual stream stays O(1).
    """

    out: nn.Linear

    @abstractmethod
    def project(self, x: Tensor, start: int = 0) -> tuple[Tensor, ...]:
        """Per-token projections of x at positions start..
        (for attention: q, k, v [B, H, n, Dh])."""

    @abstractmethod
    def mix(self, *projected: Tensor) -> Tensor:
        """The mechanism across positions, from a fresh state: [B, H, n, Dh]."""

    def merge_heads(self, o: Tensor) -> Tensor:
        """[B, H, n, Dh] -> the output projection of [B, n, H * Dh]."""
        b, _, n, _ = o.shape
        return self.out(o.transpose(1, 2).reshape(b, n, -1))

    def forward(self, x: Tensor) -> Tensor:
        return self.merge_heads(self.mix(*self.project(x)))

    def init_weights(self, n_layer: int) -> None:
        nn.init.normal_(self.out.weight, std=0.02 / math.sqrt(2 * n_layer))


def split_qkv(fused: Tensor, n_head: int) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v [B, H, n, Dh] from a fused projection [B, n, 3 * H * Dh]."""
    b, n, width = fused.shape
    q, k, v = fused.view(b, n, 3, n_head, width // (3 * n_head)).permute(2, 0, 3, 1, 4)
    return q, k, v


class StatelessMixer(Mixer):
    """A mixer that looks at one position at a time (an MLP): streaming needs no state."""

    def init_state(self, batch_size: int) -> State:
        return ()

    def step(self, x: Tensor, state: State, start: int) -> tuple[Tensor, State]:
        return self(x), state


class Backend(ABC):
    """How one named mechanism builds its layers. Subclasses register with `@register`.

    `Options` is a dataclass whose defaults are those of docs/attention.md; the config section
    (minus `name` and `kernel`) is validated against it when the backend is built. `kernel`
    (`attention.kernel`, default `auto`) picks the implementation among `kernels`
    (longctx.ops.seam).
    """

    name: ClassVar[str]
    Options: ClassVar[type]
    # The kernels this backend implements, fastest on a GPU first (longctx.ops.seam).
    kernels: ClassVar[tuple[str, ...]] = (TORCH,)
    # True when training must feed ordered contiguous streams and carry state across batches.
    ordered_stream: ClassVar[bool] = False

    def __init__(self, options: Any, dims: ModelSettings, kernel: str = AUTO):
        self.options = options
        self.dims = dims
        self.kernel = kernel
        self.validate()
        check_kernel_choice(self.name, kernel, self.supported_kernels())

    @classmethod
    def from_config(cls, attn_cfg: Mapping, dims: ModelSettings) -> Backend:
        fields = {f.name for f in dataclasses.fields(cls.Options)}
        given = {k: v for k, v in dict(attn_cfg).items() if k != "name"}
        kernel = AUTO
        # `kernel` names the implementation; aft_conv's spec also has a `kernel` option, its
        # causal kernel length: an integer there, while implementation names are strings.
        if isinstance(given.get("kernel"), str) or "kernel" not in fields:
            kernel = given.pop("kernel", AUTO)
        unknown = sorted(set(given) - fields)
        if unknown:
            raise ConfigError(
                f"attention={cls.name} has no option(s) {unknown}; valid options: "
                f"{sorted(fields | {'kernel'})}"
            )
        return cls(cls.Options(**given), dims, kernel=kernel)

    def validate(self) -> None:
        """Raise ConfigError for impossible settings (checked before any data or weights exist)."""
        return None

    def supported_kernels(self) -> tuple[str, ...]:
        """The kernels `attention.kernel` may name for this backend (fastest on a GPU first)."""
        return self.kernels

    @abstractmethod
    def mixer(self, layer: int) -> Mixer:
        """The token mixer of layer `layer`."""

    def ffn(self, layer: int) -> Mixer | None:
        """A replacement for the model's MLP in this layer, or None to keep the MLP."""
        return None

    @property
    def max_len(self) -> int | None:
        """The longest sequence `forward` accepts, or None when unbounded."""
        return None

    def attention_flops(self, seq_len: int) -> float:
        """Forward FLOPs of one layer's sequence mixing for one sequence (excluding projections).

        Used for MFU: counts the work the backend really does, not the dense formula.
        """
        raise NotImplementedError(f"{self.name} does not count its FLOPs")

    def check_sequence_length(self, seq_len: int) -> None:
        limit = self.max_len
        if limit is not None and seq_len > limit:
            raise ConfigError(
                f"attention={self.name} accepts at most {limit} positions (max_len) but got "
                f"{seq_len}; raise attention.max_len or shorten the sequence"
            )

    def require_even_heads(self, why: str) -> None:
        if self.dims.n_head % 2:
            raise ConfigError(
                f"attention={self.name} {why} needs an even model.n_head, got "
                f"{self.dims.n_head}; choose an even head count"
            )
