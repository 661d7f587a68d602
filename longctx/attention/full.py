"""Full causal softmax attention (Vaswani et al. 2017):
the baseline every backend is compared to."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from longctx.attention.base import Backend, Mixer, State
from longctx.attention.registry import register
from longctx.attention.softmax import AttentionCore, SoftmaxAttention
from longctx.core.positions import alibi_bias
from longctx.ops.softmax.masked import masked_attention


class CausalCore(AttentionCore):
    """SDPA with is_causal (flash / memory-efficient kernels);
    streaming keeps a growing KV cache."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, slopes: Tensor | None) -> Tensor:
        if slopes is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        pos = torch.arange(q.shape[-2], device=q.device)
        bias = alibi_bias(slopes, pos, pos).to(q.dtype)
        bias = bias.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    def init_cache(self, batch: int, heads: int, head_dim: int, like: Tensor) -> State:
        empty = like.new_zeros(batch, heads, 0, head_dim)
        return {"k": empty, "v": empty}

    def step(self, q, k, v, cache, start, slopes):
        keys = torch.cat((cache["k"], k), dim=2)
        values = torch.cat((cache["v"], v), dim=2)
        q_pos = torch.arange(start, start + q.shape[-2], device=q.device)
        k_pos = torch.arange(keys.shape[-2], device=q.device)
        allowed = (k_pos[None, :] <= q_pos[:, None])[None]
        return masked_attention(q, keys, values, allowed, q_pos, k_pos, slopes), {
            "k": keys,
            "v": values,
        }


@register
class FullAttention(Backend):
    name = "full"

    @dataclass(frozen=True)
    class Options:
        pass

    def mixer(self, layer: int) -> Mixer:
        return SoftmaxAttention(self.dims, CausalCore())

    def attention_flops(self, seq_len: int) -> float:
        # QK^T and PV over the causal half: 2 matmuls x 2 FLOPs x N(N+1)/2 pairs x d_model.
        return 2 * 2 * seq_len * (seq_len + 1) / 2 * self.dims.d_model
