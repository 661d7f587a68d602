"""Multi-head softmax attention around a pattern-specific core.

`SoftmaxAttention` owns what every softmax backend shares: the q/k/v and output projections
and the model's positional scheme (RoPE rotates q and k at absolute positions; ALiBi passes
head slopes to the core). An `AttentionCore` decides which keys each query sees and how to
compute that fast; its `step` keeps whatever cache its pattern needs for streaming.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

from longctx.attention.base import HeadMixer, ModelSettings, State, split_qkv
from longctx.core.positions import Rotary, alibi_slopes


class AttentionCore(nn.Module, ABC):
    """Attention of q, k, v [B, H, n, Dh] (already projected and rotated) under one pattern."""

    @abstractmethod
    def forward(self, q: Tensor, k: Tensor, v: Tensor, slopes: Tensor | None) -> Tensor:
        """Causal attention over n positions from an empty cache (`slopes`: ALiBi, or None)."""

    def prepare(self, seq_len: int, device: torch.device) -> None:
        """See Mixer.prepare."""

    @abstractmethod
    def init_cache(self, batch: int, heads: int, head_dim: int, like: Tensor) -> State:
        """The streaming cache before any token (dtype and device of `like`)."""

    @abstractmethod
    def step(
        self, q: Tensor, k: Tensor, v: Tensor, cache: State, start: int, slopes: Tensor | None
    ) -> tuple[Tensor, State]:
        """Outputs for positions start.. given the cache, and the cache after them."""


class SoftmaxAttention(HeadMixer):
    def __init__(self, dims: ModelSettings, core: AttentionCore):
        super().__init__()
        if dims.d_model % dims.n_head:
            raise ValueError(f"d_model={dims.d_model} is not divisible by n_head={dims.n_head}")
        self.n_head = dims.n_head
        self.head_dim = dims.head_dim
        self.qkv = nn.Linear(dims.d_model, 3 * dims.d_model, bias=dims.bias)
        self.out = nn.Linear(dims.d_model, dims.d_model, bias=dims.bias)
        self.core = core
        self.rotary = Rotary(self.head_dim, dims.rope_base) if dims.position == "rope" else None
        slopes = alibi_slopes(dims.n_head) if dims.position == "alibi" else None
        self.register_buffer("slopes", slopes, persistent=False)

    def project(self, x: Tensor, start: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v [B, H, n, Dh], rotated at positions start..start+n-1 under RoPE."""
        q, k, v = split_qkv(self.qkv(x), self.n_head)
        if self.rotary is not None:
            positions = torch.arange(start, start + x.shape[1], device=x.device)
            q, k = self.rotary(q, positions), self.rotary(k, positions)
        return q, k, v

    def mix(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return self.core(q, k, v, self.slopes)

    def prepare(self, seq_len: int, device: torch.device) -> None:
        self.core.prepare(seq_len, device)

    def init_state(self, batch_size: int) -> State:
        return self.core.init_cache(batch_size, self.n_head, self.head_dim, self.out.weight)

    def step(self, x: Tensor, state: State, start: int) -> tuple[Tensor, State]:
        q, k, v = self.project(x, start)
        o, state = self.core.step(q, k, v, state, start, self.slopes)
        return self.merge_heads(o), state
