"""Multi-head softmax attention around a pattern-specific core.

`SoftmaxAttention` owns what every softmax backend shares: the q/k/v and output projections
and the model's positional scheme (RoPE rotates q and k at absolute positions; ALiBi passes
head slopes to the core). An `AttentionCore` decides which keys each query sees and how to
compute that fast; its `step` keeps whatever cache its pattern needs for streaming.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

from longctx.attention.base import Mixer, ModelDims, State
from longctx.model.positions import Rotary, alibi_slopes


class AttentionCore(nn.Module, ABC):
    """Attention of q, k, v [B, H, n, Dh] (already projected and rotated) under one pattern."""

    @abstractmethod
    def forward(self, q: Tensor, k: Tensor, v: Tensor, slopes: Tensor | None) -> Tensor:
        """Causal attention over n positions from an empty cache (`slopes`: ALiBi, or None)."""

    @abstractmethod
    def init_cache(self, batch: int, heads: int, head_dim: int, like: Tensor) -> State:
        """The streaming cache before any token (dtype and device of `like`)."""

    @abstractmethod
    def step(
        self, q: Tensor, k: Tensor, v: Tensor, cache: State, start: int, slopes: Tensor | None
    ) -> tuple[Tensor, State]:
        """Outputs for positions start.. given the cache, and the cache after them."""


class SoftmaxAttention(Mixer):
    def __init__(self, dims: ModelDims, core: AttentionCore):
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

    def init_weights(self, n_layer: int) -> None:
        # GPT-2: residual projections scaled down with depth so the residual stream stays O(1).
        nn.init.normal_(self.out.weight, std=0.02 / math.sqrt(2 * n_layer))

    def project(self, x: Tensor, start: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v [B, H, n, Dh], rotated at positions start..start+n-1 under RoPE."""
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.rotary is not None:
            positions = torch.arange(start, start + n, device=x.device)
            q, k = self.rotary(q, positions), self.rotary(k, positions)
        return q, k, v

    def _merge(self, o: Tensor) -> Tensor:
        b, _, n, _ = o.shape
        return self.out(o.transpose(1, 2).reshape(b, n, -1))

    def mix(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return self.core(q, k, v, self.slopes)

    def forward(self, x: Tensor) -> Tensor:
        return self._merge(self.mix(*self.project(x)))

    def init_state(self, batch_size: int) -> State:
        return self.core.init_cache(batch_size, self.n_head, self.head_dim, self.out.weight)

    def step(self, x: Tensor, state: State, start: int) -> tuple[Tensor, State]:
        q, k, v = self.project(x, start)
        o, state = self.core.step(q, k, v, state, start, self.slopes)
        return self._merge(o), state
