"""The attention core and backend base shared by every sparse softmax pattern.

`SparseCore` runs a `LayerPattern` with the kernel the seam picks (longctx.ops.seam): `flex`,
FlexAttention with a BlockMask (the GPU kernel; its compiled forward also runs on a CPU), or
`torch`, the block-sparse engine (the CPU training path: FlexAttention has no CPU backward).
Streaming keeps exactly the keys the pattern can still reach. `SparseBackend` turns "which
pattern in layer l" into mixers and FLOP counts.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from torch import Tensor

from longctx.attention.base import Backend, Mixer, State
from longctx.attention.softmax import AttentionCore, SoftmaxAttention
from longctx.ops.pieces import rows_per_piece
from longctx.ops.seam import AUTO, FLEX, TORCH, resolve_kernel
from longctx.ops.softmax.masked import masked_attention, pattern_mask
from longctx.ops.sparse.flex import flex_pattern_attention, prepare_flex_pattern
from longctx.ops.sparse.patterns import LayerPattern


def step_rows(q: Tensor, cached: int) -> int:
    """Queries per piece of a streaming step over `cached` earlier keys plus q's own."""
    batch, heads, n, _ = q.shape
    return rows_per_piece(batch * heads * (cached + n))


class SparseCore(AttentionCore):
    # The kernels of every sparse pattern, fastest on a GPU first.
    kernels = (FLEX, TORCH)

    def __init__(self, pattern: LayerPattern, kernel: str = AUTO):
        super().__init__()
        self.pattern = pattern
        self.kernel = kernel

    def forward(self, q: Tensor, k: Tensor, v: Tensor, slopes: Tensor | None) -> Tensor:
        if resolve_kernel(self.kernel, self.kernels, q.device) == FLEX:
            return flex_pattern_attention(q, k, v, self.pattern, slopes)
        return self.pattern.attend(q, k, v, slopes)

    def prepare(self, seq_len: int, device: torch.device) -> None:
        if resolve_kernel(self.kernel, self.kernels, device) == FLEX:
            prepare_flex_pattern(self.pattern, seq_len, device)

    def init_cache(self, batch: int, heads: int, head_dim: int, like: Tensor) -> State:
        empty = like.new_zeros(batch, heads, 0, head_dim)
        return {"k": empty, "v": empty, "pos": torch.zeros(0, dtype=torch.long, device=like.device)}

    def step(self, q, k, v, cache, start, slopes):
        outputs = []
        # A long prompt in pieces: the dense mask over cache + piece stays within the budget.
        rows = step_rows(q, cache["k"].shape[2])
        for offset in range(0, q.shape[-2], rows):
            piece = slice(offset, offset + rows)
            q_piece = q[:, :, piece]
            q_pos = torch.arange(
                start + offset, start + offset + q_piece.shape[-2], device=q.device
            )
            keys = torch.cat((cache["k"], k[:, :, piece]), 2)
            values = torch.cat((cache["v"], v[:, :, piece]), 2)
            k_pos = torch.cat((cache["pos"], q_pos))
            allowed = pattern_mask(self.pattern.allowed, q.shape[1], q_pos, k_pos)
            outputs.append(masked_attention(q_piece, keys, values, allowed, q_pos, k_pos, slopes))
            kept = self.pattern.keep(k_pos, int(q_pos[-1]) + 1)
            cache = {"k": keys[:, :, kept], "v": values[:, :, kept], "pos": k_pos[kept]}
        return torch.cat(outputs, 2), cache


class SparseBackend(Backend):
    """A backend whose layers are softmax attention under a `LayerPattern`."""

    kernels = SparseCore.kernels

    @abstractmethod
    def pattern(self, layer: int) -> LayerPattern:
        """The head groups and their components in layer `layer`."""

    def mixer(self, layer: int) -> Mixer:
        return SoftmaxAttention(self.dims, SparseCore(self.pattern(layer), self.kernel))

    def attention_flops(self, seq_len: int) -> float:
        """4 x head_dim x the (query, key) pairs the CPU engine computes, summed over heads.

        Pairs are whole tiles read (the masked part of partially allowed tiles and a chunk's
        padding to its widest row included, see longctx.ops.sparse.engine.computed_pairs),
        averaged over the layers when they differ (the MFU counter multiplies by n_layer).
        """
        layers = range(self.dims.n_layer)
        pairs = (
            sum(self.pattern(layer).computed_pairs(seq_len) for layer in layers) / self.dims.n_layer
        )
        return 4.0 * self.dims.head_dim * pairs
