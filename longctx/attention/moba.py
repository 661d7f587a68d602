"""Content-based block sparsity: Mixture of Block Attention
(Lu et al. 2025, MoBA; NSA's selection branch).

Semantics, per head, with b = block_size (block m covers positions [m*b, (m+1)*b)):
- Query i lies in block c = floor(i / b). Its candidate blocks are the blocks m < c: all complete,
  all in its past. Gating never reads a block that is not complete (not even the query's own).
- Gate score s(i, m) = q_i . mean_{j in block m} k_j, on the same q and k the attention uses (after
  RoPE). Query i selects the top_k candidates with the highest scores, or all of them when
  c <= top_k. Ties go to the earlier block.
- Query i then attends with ONE softmax over the keys j <= i of its own block plus every key of its
  selected blocks (scale 1/sqrt(head_dim); ALiBi slopes, when the model uses ALiBi, add
  -slope * (i - j) to the attention scores, not to the gate).
- The selection is a discrete top-k: no gradient flows through the gate, only through the attention
  over the selected keys.

The gate lives in longctx/ops/moba/gate.py (exactness, dtypes). Kernels (longctx.ops.seam):
`torch`, the CPU engine (ops/moba/engine.py: (query, selected block) pairs grouped by key block,
cost grows with top_k * block_size per query, never with N^2; gate in float64); `flex`,
FlexAttention with a BlockMask built on the device from the selection (ops/moba/flex.py; gate in
float32, no host sync). Streaming keeps the K/V of every past position (complete blocks and the
raw current block) plus the key sum of each complete block: the state grows with n.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from longctx.attention.base import Backend, Mixer, State
from longctx.attention.registry import register
from longctx.attention.softmax import AttentionCore, SoftmaxAttention
from longctx.errors import ConfigError
from longctx.ops.head_parallel import across_heads
from longctx.ops.moba.engine import block_sparse_attention
from longctx.ops.moba.flex import flex_moba_attention
from longctx.ops.moba.gate import block_key_sums, select_blocks
from longctx.ops.seam import AUTO, FLEX, TORCH, resolve_kernel

# The gate's score dtype per kernel (longctx/ops/moba/gate.py says why).
GATE_DTYPE = {TORCH: torch.float64, FLEX: torch.float32}


class MobaCore(AttentionCore):
    # Fastest on a GPU first (longctx.ops.seam).
    kernels = (FLEX, TORCH)

    def __init__(self, block_size: int, top_k: int, kernel: str = AUTO):
        super().__init__()
        self.block_size = block_size
        self.top_k = top_k
        self.kernel = kernel

    def forward(self, q: Tensor, k: Tensor, v: Tensor, slopes: Tensor | None) -> Tensor:
        kernel = resolve_kernel(self.kernel, self.kernels, q.device)
        if kernel == FLEX:
            selected = self._select(q, k, kernel)
            return flex_moba_attention(q, k, v, selected, self.block_size, slopes)
        return across_heads(self._gated_attention, (q, k, v, slopes), (1, 1, 1, 0))

    def _select(self, q: Tensor, k: Tensor, kernel: str) -> Tensor:
        key_sums = block_key_sums(k.detach(), self.block_size, GATE_DTYPE[kernel])
        return select_blocks(q, key_sums, 0, self.block_size, self.top_k)

    def _gated_attention(self, q: Tensor, k: Tensor, v: Tensor, slopes: Tensor | None) -> Tensor:
        """The gate and the torch engine, for the heads of q, k, v."""
        selected = self._select(q, k, TORCH)
        return block_sparse_attention(q, k, v, selected, self.block_size, slopes)

    def init_cache(self, batch: int, heads: int, head_dim: int, like: Tensor) -> State:
        # The gate in the dtype `forward` uses on this device, so streaming selects alike.
        dtype = GATE_DTYPE[resolve_kernel(self.kernel, self.kernels, like.device)]
        empty = like.new_zeros(batch, heads, 0, head_dim)
        key_sums = torch.zeros(batch, heads, 0, head_dim, dtype=dtype, device=like.device)
        return {"k": empty, "v": empty, "key_sums": key_sums}

    def step(self, q, k, v, cache, start, slopes):
        b = self.block_size
        keys = torch.cat((cache["k"], k), dim=2)
        values = torch.cat((cache["v"], v), dim=2)
        done, complete = cache["key_sums"].shape[2], keys.shape[2] // b
        key_sums = torch.cat(
            (
                cache["key_sums"],
                block_key_sums(keys[:, :, done * b : complete * b], b, cache["key_sums"].dtype),
            ),
            dim=2,
        )
        selected = select_blocks(q, key_sums, start, b, self.top_k)
        # The engine starts at a block boundary: the current block's earlier positions get zero
        # placeholder queries with no selected block, whose outputs are dropped.
        q_start = start - start % b
        placeholders = q.new_zeros(*q.shape[:2], start - q_start, q.shape[3])
        no_blocks = selected.new_full((*selected.shape[:2], start - q_start, selected.shape[3]), -1)
        out = block_sparse_attention(
            torch.cat((placeholders, q), dim=2),
            keys,
            values,
            torch.cat((no_blocks, selected), dim=2),
            b,
            slopes,
            q_start,
        )
        return out[:, :, start - q_start :], {"k": keys, "v": values, "key_sums": key_sums}


@register
class MobaAttention(Backend):
    name = "moba"
    kernels = MobaCore.kernels

    @dataclass(frozen=True)
    class Options:
        block_size: int = 256
        top_k: int = 4

    def validate(self) -> None:
        b, top_k = self.options.block_size, self.options.top_k
        if b < 1:
            raise ConfigError(
                f"attention.block_size must be >= 1, got {b}; e.g. attention.block_size=256"
            )
        if top_k < 0:
            raise ConfigError(f"attention.top_k must be >= 0 (0 = own block only), got {top_k}")
        if b > self.dims.context_length:
            raise ConfigError(
                f"attention.block_size={b} is longer than "
                f"context_length={self.dims.context_length}: "
                "no query would ever see a complete earlier block; lower attention.block_size"
            )

    def mixer(self, layer: int) -> Mixer:
        core = MobaCore(self.options.block_size, self.options.top_k, self.kernel)
        return SoftmaxAttention(self.dims, core)

    def attention_flops(self, seq_len: int) -> float:
        """Own-block causal pairs + selected pairs (QK^T and PV: 4 FLOPs per pair per channel of
        d_model) + gate dot products with every complete earlier block (2 FLOPs per channel)."""
        b, top_k = self.options.block_size, self.options.top_k
        pairs = gate = 0
        for block in range(-(-seq_len // b)):
            rows = min(b, seq_len - block * b)
            pairs += rows * (rows + 1) // 2 + rows * min(top_k, block) * b
            gate += rows * block
        return (4 * pairs + 2 * gate) * self.dims.d_model
