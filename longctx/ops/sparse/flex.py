"""CUDA path of the sparse patterns: compiled FlexAttention with a BlockMask from the block layout.

The BlockMask is built at block level (an [H, N/128, N/128] layout from each head's key lower
bound and global prefix), never from an N x N mask; the exact predicate runs as mask_mod
inside the partially allowed tiles, ALiBi as score_mod. Only used when q.is_cuda.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

# FlexAttention's default tile; the layout is computed at this granularity.
FLEX_BLOCK = 128
# Compiled variants of flex_attention kept: distinct (layer pattern, length) pairs of a run.
RECOMPILE_LIMIT = 64


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def block_layout(pattern, n: int, device: torch.device) -> Tensor:
    """Bool [H, n_blocks, n_blocks]: the key tiles each query tile may touch, per head.

    Tile (r, c) is read when c <= r and c either reaches the head's lowest key of the tile's
    first query (pattern.first_key is non-decreasing) or holds one of its global positions.
    """
    n_blocks = -(-n // FLEX_BLOCK)
    heads = torch.arange(pattern.n_head, device=device)[:, None, None]
    rows = torch.arange(n_blocks, device=device)[None, :, None]
    cols = torch.arange(n_blocks, device=device)[None, None, :]
    lowest = pattern.first_key(heads, rows * FLEX_BLOCK).clamp_min(0) // FLEX_BLOCK
    is_global = cols * FLEX_BLOCK < pattern.prefix(heads)
    return (cols <= rows) & ((cols >= lowest) | is_global)


@functools.lru_cache(maxsize=16)
def _block_mask(pattern, n: int, device: torch.device):
    from torch.nn.attention.flex_attention import BlockMask

    layout = block_layout(pattern, n, device)
    counts = layout.sum(-1, dtype=torch.int32)
    # Read tiles first, in column order: a stable sort of "not read" puts them in front.
    indices = torch.sort((~layout).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)

    def mask_mod(batch, head, q_idx, kv_idx):
        return pattern.allowed(head, q_idx, kv_idx) & (kv_idx <= q_idx)

    return BlockMask.from_kv_blocks(
        counts[None], indices[None], BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod, seq_lengths=(n, n)
    )


def _alibi(slopes: Tensor):
    def score_mod(score, batch, head, q_idx, kv_idx):
        return score - slopes[head] * (q_idx - kv_idx)

    return score_mod


def flex_pattern_attention(
    q: Tensor, k: Tensor, v: Tensor, pattern, slopes: Tensor | None
) -> Tensor:
    """Attention of q, k, v [B, H, N, D] on CUDA under `pattern`
    (a sparse_patterns.LayerPattern)."""
    from torch.nn.attention.flex_attention import flex_attention

    score_mod = None if slopes is None else _alibi(slopes.to(device=q.device, dtype=torch.float32))
    block_mask = _block_mask(pattern, q.shape[-2], q.device)
    if torch.compiler.is_compiling():  # inside a compiled model, which compiles flex itself
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)
    # mask_mod closes over the layer's pattern, so each distinct pattern (per-layer windows,
    # layouts by layer) and length compiles once: allow more than dynamo's default 8.
    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
        return _compiled_flex()(q, k, v, score_mod=score_mod, block_mask=block_mask)
