"""MoBA's attention given a selection, as one dense masked softmax: the O(N^2) reference that the
engine and the Flex kernel are held equal to (tests, and the generic backend suite)."""

from __future__ import annotations

import torch
from torch import Tensor

from longctx.ops.softmax.masked import masked_attention


def selection_mask(selected: Tensor, block_size: int, n: int) -> Tensor:
    """allowed [B, H, n, n]: the query's own block up to itself, plus every key of its selected
    blocks (selected [B, H, n, K], -1 = empty slot)."""
    pos = torch.arange(n, device=selected.device)
    block = pos // block_size
    own = (block[None, :] == block[:, None]) & (pos[None, :] <= pos[:, None])
    chosen = (selected[..., None] == block).any(-2)
    return own | chosen


def reference_moba_attention(
    q: Tensor, k: Tensor, v: Tensor, selected: Tensor, block_size: int, slopes: Tensor | None
) -> Tensor:
    """Attention of q, k, v [B, H, N, D] over each query's own block and selected blocks."""
    pos = torch.arange(q.shape[2], device=q.device)
    allowed = selection_mask(selected, block_size, q.shape[2])
    return masked_attention(
        q, k, v, allowed, pos, pos, None if slopes is None else slopes.to(q.dtype)
    )
