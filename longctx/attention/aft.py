"""Attention Free Transformer (Zhai et al. 2021): aft_full, aft_local, aft_simple, aft_conv.

Per channel (no dot products between positions):

    Y_t = sigmoid(Q_t) * sum_{t'<=t} e^{K_t' + w[t,t']} V_t' / sum_{t'<=t} e^{K_t' + w[t,t']}

with a position bias w shared by the channels:
- aft_full: a learned [max_len, max_len] bias, factorised w = U V^T (rank FULL_RANK) as the paper
  suggests for long sequences; O(N^2) by nature, refuses N > max_len.
- aft_local: w[t, t'] is a learned table entry for t - t' < window and 0 (not -inf) outside, so
  older positions still count with weight e^K: every position sees all its past.
- aft_conv: the bias depends only on t - t' (one kernel per head) inside a causal kernel, 0 outside.
- aft_simple: w = 0, a running softmax-weighted mean: the WKV operator with no decay and no
  bonus (longctx/ops/wkv), constant streaming state.

The biased variants run on the blocked engine (longctx/ops/aft/blocked.py), one query at a time
when streaming single tokens (longctx/ops/aft/reference.py).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from longctx.attention.base import Backend, HeadMixer, Mixer, ModelSettings, State, split_qkv
from longctx.attention.registry import register
from longctx.errors import ConfigError
from longctx.ops.aft.blocked import (
    FULL_BLOCK,
    LOCAL_BLOCK,
    BiasFn,
    aft_blocked,
    blocked_flops,
)
from longctx.ops.aft.reference import aft_one_query, prefix_after
from longctx.ops.head_parallel import across_heads
from longctx.ops.wkv.chunk import wkv_across_heads, wkv_flops
from longctx.ops.wkv.reference import WkvState, empty_wkv_state, wkv_recurrent

# Rank of aft_full's factorised bias w = U V^T (the paper's d' = 128 for long sequences).
FULL_RANK = 128


class AFTMixer(HeadMixer):
    """Q, K, V projections over d_model channels (viewed as [B, H, n, Dh]),
    then sigmoid(Q) * mean."""

    def __init__(self, dims: ModelSettings):
        super().__init__()
        self.n_head, self.head_dim = dims.n_head, dims.head_dim
        self.qkv = nn.Linear(dims.d_model, 3 * dims.d_model, bias=dims.bias)
        self.out = nn.Linear(dims.d_model, dims.d_model, bias=dims.bias)

    def project(self, x: Tensor, start: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v [B, H, n, Dh]; position enters only through the bias w."""
        return split_qkv(self.qkv(x), self.n_head)

    def _empty_prefix(self, batch_size: int) -> WkvState:
        return empty_wkv_state((batch_size, self.n_head, self.head_dim), self.out.weight)


class SimpleAFT(AFTMixer):
    """w = 0: the WKV operator with no decay and no bonus; constant state (a, b, p)."""

    def _zeros(self, like: Tensor) -> Tensor:
        return like.new_zeros(self.n_head, self.head_dim)

    def mix(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        zero = self._zeros(k)
        state = empty_wkv_state(k.shape[:-2] + k.shape[-1:], k)
        return torch.sigmoid(q) * wkv_across_heads(k, v, zero, zero, state)[0]

    def init_state(self, batch_size: int) -> State:
        return self._empty_prefix(batch_size)

    def step(self, x: Tensor, state: State, start: int) -> tuple[Tensor, State]:
        q, k, v = self.project(x, start)
        zero = self._zeros(k)
        if x.shape[1] == 1:
            mean, state = wkv_recurrent(k, v, zero, zero, state)
        else:
            mean, state = wkv_across_heads(k, v, zero, zero, state)
        return self.merge_heads(torch.sigmoid(q) * mean), state


class BlockedAFT(AFTMixer):
    """A biased AFT on the blocked engine. Streaming keeps the keys the band still reaches (all of
    them when the band is unbounded) plus a prefix state of the older ones."""

    band: int | None
    block: int
    # Where the learned bias tensors hold the heads (None: one bias shared by every head).
    bias_head_dim: int | None = None

    @abstractmethod
    def bias_tensors(self) -> tuple[Tensor, ...]:
        """The learned tensors the bias reads (passed to `bias_for`, never captured, so that a
        kernel running on other threads still returns their gradients)."""

    @abstractmethod
    def bias_for(self, offset: int, length: int, *tensors: Tensor) -> BiasFn:
        """The bias of sequence indices 0..length-1 at absolute positions offset.., read from
        `tensors` (this mixer's bias_tensors, or their slices for some heads)."""

    def mix(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        prefix = empty_wkv_state(k.shape[:-2] + k.shape[-1:], k)
        args = (k, v, prefix, self.bias_tensors())
        mean = across_heads(self._blocked_mean, args, (1, 1, 1, self.bias_head_dim))
        return torch.sigmoid(q) * mean

    def _blocked_mean(self, k: Tensor, v: Tensor, prefix, tensors: tuple[Tensor, ...]) -> Tensor:
        bias = self.bias_for(0, k.shape[-2], *tensors)
        return aft_blocked(k, v, bias, self.band, self.block, prefix)

    def init_state(self, batch_size: int) -> State:
        empty = self.out.weight.new_zeros(batch_size, self.n_head, 0, self.head_dim)
        return {"k": empty, "v": empty, "prefix": self._empty_prefix(batch_size)}

    def step(self, x: Tensor, state: State, start: int) -> tuple[Tensor, State]:
        q, k, v = self.project(x, start)
        cached = state["k"].shape[-2]
        keys = torch.cat((state["k"], k), -2)
        values = torch.cat((state["v"], v), -2)
        bias = self.bias_for(start - cached, keys.shape[-2], *self.bias_tensors())
        if x.shape[1] == 1:
            mean = aft_one_query(keys, values, bias, state["prefix"])
        else:
            mean = aft_blocked(keys, values, bias, self.band, self.block, state["prefix"], cached)
        # The next query (position start + n) reaches back to lag band - 1 with learned bias.
        keep = keys.shape[-2] if self.band is None else min(keys.shape[-2], self.band - 1)
        leaving = keys.shape[-2] - keep
        prefix = prefix_after(state["prefix"], keys[..., :leaving, :], values[..., :leaving, :])
        new_state = {"k": keys[..., leaving:, :], "v": values[..., leaving:, :], "prefix": prefix}
        return self.merge_heads(torch.sigmoid(q) * mean), new_state


# The bias functions index a slice of the parameter taken once per call: indexing the whole table
# in every block would cost a zero-filled table-sized gradient per index in the backward pass.


class FullAFT(BlockedAFT):
    def __init__(self, dims: ModelSettings, max_len: int):
        super().__init__(dims)
        self.band, self.block = None, FULL_BLOCK
        # V = 0 starts from w = 0 (AFT-simple) while U's scale lets V learn at once.
        self.u = nn.Parameter(torch.randn(max_len, FULL_RANK) / math.sqrt(FULL_RANK))
        self.v = nn.Parameter(torch.zeros(max_len, FULL_RANK))

    def bias_tensors(self) -> tuple[Tensor, ...]:
        return self.u, self.v

    def bias_for(self, offset: int, length: int, *tensors: Tensor) -> BiasFn:
        u, v = (t[offset : offset + length] for t in tensors)
        last = length - 1  # padding rows of the last block pass the end

        def bias(rows: Tensor, cols: Tensor) -> Tensor:
            return (u[rows.clamp(max=last)] @ v[cols.clamp(max=last)].transpose(-1, -2)).unsqueeze(
                0
            )

        return bias


class LocalAFT(BlockedAFT):
    def __init__(self, dims: ModelSettings, max_len: int, window: int):
        super().__init__(dims)
        self.band, self.block = window, LOCAL_BLOCK
        # w[t, t - lag] for lag < window, stored as a band: row t, column lag.
        self.w = nn.Parameter(torch.zeros(max_len, window))

    def bias_tensors(self) -> tuple[Tensor, ...]:
        return (self.w,)

    def bias_for(self, offset: int, length: int, *tensors: Tensor) -> BiasFn:
        table, last = tensors[0][offset : offset + length], length - 1

        def bias(rows: Tensor, cols: Tensor) -> Tensor:
            lag = (rows[:, :, None] - cols[:, None, :]).clamp(0, self.band - 1)
            return table[rows[:, :, None].clamp(max=last), lag].unsqueeze(0)

        return bias


class ConvAFT(BlockedAFT):
    bias_head_dim = 0  # w [H, kernel]: a kernel per head

    def __init__(self, dims: ModelSettings, kernel: int):
        super().__init__(dims)
        self.band, self.block = kernel, LOCAL_BLOCK
        self.w = nn.Parameter(torch.zeros(dims.n_head, kernel))  # one causal kernel per head

    def bias_tensors(self) -> tuple[Tensor, ...]:
        return (self.w,)

    def bias_for(self, offset: int, length: int, *tensors: Tensor) -> BiasFn:
        (w,) = tensors

        def bias(rows: Tensor, cols: Tensor) -> Tensor:
            return w[:, (rows[:, :, None] - cols[:, None, :]).clamp(0, self.band - 1)]

        return bias


class _AFTBackend(Backend):
    def _positive(self, **values: int) -> None:
        for key, value in values.items():
            if value < 1:
                raise ConfigError(
                    f"attention.{key} must be >= 1 for attention={self.name}, got {value}"
                )


@register
class AFTFull(_AFTBackend):
    name = "aft_full"

    @dataclass(frozen=True)
    class Options:
        max_len: int = 4096

    def validate(self) -> None:
        self._positive(max_len=self.options.max_len)

    @property
    def max_len(self) -> int | None:
        return self.options.max_len

    def mixer(self, layer: int) -> Mixer:
        return FullAFT(self.dims, self.options.max_len)

    def attention_flops(self, seq_len: int) -> float:
        return blocked_flops(seq_len, FULL_BLOCK, None, self.dims.d_model)


@register
class AFTLocal(_AFTBackend):
    name = "aft_local"

    @dataclass(frozen=True)
    class Options:
        max_len: int = 4096
        window: int = 256

    def validate(self) -> None:
        self._positive(max_len=self.options.max_len, window=self.options.window)

    @property
    def max_len(self) -> int | None:
        return self.options.max_len

    def mixer(self, layer: int) -> Mixer:
        return LocalAFT(self.dims, self.options.max_len, self.options.window)

    def attention_flops(self, seq_len: int) -> float:
        return blocked_flops(seq_len, LOCAL_BLOCK, self.options.window, self.dims.d_model)


@register
class AFTSimple(_AFTBackend):
    name = "aft_simple"

    @dataclass(frozen=True)
    class Options:
        pass

    def mixer(self, layer: int) -> Mixer:
        return SimpleAFT(self.dims)

    def attention_flops(self, seq_len: int) -> float:
        return wkv_flops(seq_len, self.dims.d_model)


@register
class AFTConv(_AFTBackend):
    name = "aft_conv"

    @dataclass(frozen=True)
    class Options:
        kernel: int = 64

    def validate(self) -> None:
        self._positive(kernel=self.options.kernel)

    def mixer(self, layer: int) -> Mixer:
        return ConvAFT(self.dims, self.options.kernel)

    def attention_flops(self, seq_len: int) -> float:
        return blocked_flops(seq_len, LOCAL_BLOCK, self.options.kernel, self.dims.d_model)
