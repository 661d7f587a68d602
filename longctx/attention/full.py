"""Full causal softmax attention (Vaswani et al. 2017): the baseline every backend is compared to.

Kernels (longctx.ops.seam): `torch`, SDPA's fused causal kernels, or with ALiBi the block-sparse
engine over the causal pattern; `flex`, FlexAttention, ALiBi as a score_mod. Neither ever
builds a dense [H, N, N] bias. `auto` on a GPU takes SDPA (flash attention) without ALiBi and
Flex with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from longctx.attention.base import Backend, Mixer, State
from longctx.attention.registry import register
from longctx.attention.softmax import SoftmaxAttention
from longctx.attention.sparse_core import SparseCore, step_rows
from longctx.ops.seam import FLEX, TORCH, resolve_kernel
from longctx.ops.softmax.masked import masked_attention
from longctx.ops.sparse.flex import flex_pattern_attention
from longctx.ops.sparse.patterns import Causal, LayerPattern


class CausalCore(SparseCore):
    """The causal pattern; streaming keeps a growing KV cache (every key, so no positions)."""

    def __init__(self, n_head: int, kernel: str):
        super().__init__(LayerPattern.uniform(n_head, Causal()), kernel)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, slopes: Tensor | None) -> Tensor:
        fastest = (TORCH, FLEX) if slopes is None else (FLEX, TORCH)
        kernel = resolve_kernel(self.kernel, fastest, q.device)
        if kernel == FLEX:
            return flex_pattern_attention(q, k, v, self.pattern, slopes)
        if slopes is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.pattern.attend(q, k, v, slopes)

    def prepare(self, seq_len: int, device: torch.device) -> None:
        if resolve_kernel(self.kernel, (FLEX, TORCH), device) == FLEX:
            super().prepare(seq_len, device)

    def init_cache(self, batch: int, heads: int, head_dim: int, like: Tensor) -> State:
        empty = like.new_zeros(batch, heads, 0, head_dim)
        return {"k": empty, "v": empty}

    def step(self, q, k, v, cache, start, slopes):
        keys = torch.cat((cache["k"], k), dim=2)
        values = torch.cat((cache["v"], v), dim=2)
        k_pos = torch.arange(keys.shape[-2], device=q.device)
        outputs, rows = [], step_rows(q, cache["k"].shape[2])
        for offset in range(0, q.shape[-2], rows):  # a long prompt in pieces
            q_piece = q[:, :, offset : offset + rows]
            q_pos = start + offset + torch.arange(q_piece.shape[-2], device=q.device)
            allowed = (k_pos[None, :] <= q_pos[:, None])[None]
            outputs.append(masked_attention(q_piece, keys, values, allowed, q_pos, k_pos, slopes))
        return torch.cat(outputs, 2), {"k": keys, "v": values}


@register
class FullAttention(Backend):
    name = "full"
    kernels = SparseCore.kernels

    @dataclass(frozen=True)
    class Options:
        pass

    def mixer(self, layer: int) -> Mixer:
        return SoftmaxAttention(self.dims, CausalCore(self.dims.n_head, self.kernel))

    def attention_flops(self, seq_len: int) -> float:
        # QK^T and PV over the causal half: 2 matmuls x 2 FLOPs x N(N+1)/2 pairs x d_model.
        return 2 * 2 * seq_len * (seq_len + 1) / 2 * self.dims.d_model
