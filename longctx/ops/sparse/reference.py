"""The dense reference of a sparse pattern: one softmax under the full N x N mask of its predicate.

O(N^2) by construction: what the CPU engine and the Flex kernel are held equal to in tests.
"""

from __future__ import annotations

import torch
from torch import Tensor

from longctx.ops.softmax.masked import Predicate, masked_attention, pattern_mask


def reference_attention(
    q: Tensor, k: Tensor, v: Tensor, predicate: Predicate, slopes: Tensor | None = None
) -> Tensor:
    """Attention of every position 0..N-1 of q, k, v [B, H, N, D] under `predicate`."""
    n = q.shape[-2]
    pos = torch.arange(n, device=q.device)
    mask = pattern_mask(predicate, q.shape[1], pos, pos)
    return masked_attention(q, k, v, mask, pos, pos, slopes)
