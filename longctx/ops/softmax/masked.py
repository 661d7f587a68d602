"""Dense masked softmax attention.

`masked_attention` is the one place a softmax is taken over an explicit mask: streaming steps
use it over their small caches, the dense references (longctx/ops/sparse/reference.py) over N×N.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn import functional as F

from longctx.core.positions import alibi_bias

# predicate(h, i, j) -> bool tensor broadcastable to [H, nq, nk];
# h: [H,1,1], i: [1,nq,1], j: [1,1,nk]
Predicate = Callable[[Tensor, Tensor, Tensor], Tensor]


def masked_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    allowed: Tensor,
    q_pos: Tensor,
    k_pos: Tensor,
    slopes: Tensor | None = None,
) -> Tensor:
    """Softmax attention of q [B,H,nq,D] over k, v [B,H,nk,D] where `allowed` [H|1, nq, nk] holds.

    Every row of `allowed` must have at least one True (patterns always allow j = i).
    """
    if slopes is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    bias = alibi_bias(slopes, q_pos, k_pos).to(q.dtype)
    bias = bias.masked_fill(~allowed, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def pattern_mask(predicate: Predicate, n_head: int, q_pos: Tensor, k_pos: Tensor) -> Tensor:
    """The boolean mask [H, nq, nk] of a causal pattern (j <= i is always enforced)."""
    h = torch.arange(n_head, device=q_pos.device)[:, None, None]
    i = q_pos[None, :, None]
    j = k_pos[None, None, :]
    return (predicate(h, i, j) & (j <= i)).expand(n_head, len(q_pos), len(k_pos))
