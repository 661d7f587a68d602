"""MoBA on FlexAttention: a BlockMask built on the device from the gate's selection.

Query tile R (128 queries) reads its own blocks' keys up to its last query, and every key tile
overlapping a block that one of its queries selected; mask_mod applies the exact rule per query
(own block up to itself, or a selected block). Tiles are full where every query of the tile may
read every key: below the diagonal inside the own block, or inside a block that all of the
tile's queries selected. Everything is built with tensor operations whose shapes come from Python
integers, so neither the BlockMask nor the call waits for the device (no host sync).

Cost: a query tile reads the union of its queries' selections. A trained gate selects alike for
neighbouring queries; random queries select differently in every row, and the union then grows
towards dense (the CPU engine's cost does not depend on it: it groups by (query, block) pair).
"""

from __future__ import annotations

import torch
from torch import Tensor

from longctx.ops.softmax.flex import TILE, block_mask_from_tiles, bucket, flex, mask_input


def _tile_grids(selected: Tensor, block_size: int, length: int) -> tuple[Tensor, Tensor]:
    """(read, full) bool [B, H, q tiles, kv tiles] for queries and keys 0..length-1."""
    batch, heads, _, slots = selected.shape
    device, n_tiles = selected.device, length // TILE
    n_blocks = -(-length // block_size)
    tile = torch.arange(n_tiles, device=device)
    first, last = tile * TILE, tile * TILE + TILE - 1  # of each tile (rows or keys)
    # Own blocks: row r reads [r // b * b, r]; the tile's rows read [first row's block start, last
    # row]; a key tile is inside every row's range when it starts at or after the last row's
    # block and ends at or before the first row.
    rows_first, rows_last = first[:, None], last[:, None]
    read = (first[None, :] <= rows_last) & (last[None, :] >= rows_first // block_size * block_size)
    full = (first[None, :] >= rows_last // block_size * block_size) & (last[None, :] <= rows_first)
    if slots == 0:
        return read[None, None], full[None, None]
    # Selected blocks: per query tile, how many of its rows selected each block (a last column
    # collects the empty slots).
    row_tile = torch.arange(selected.shape[2], device=device) // TILE
    column = torch.where(selected >= 0, selected, n_blocks)
    index = (row_tile[:, None] * (n_blocks + 1) + column).reshape(batch, heads, -1)
    counts = torch.zeros(batch, heads, n_tiles * (n_blocks + 1), device=device)
    counts.scatter_add_(-1, index, torch.ones_like(index, dtype=counts.dtype))
    counts = counts.view(batch, heads, n_tiles, n_blocks + 1)[..., :n_blocks]
    block = torch.arange(n_blocks, device=device)[:, None]
    overlaps = (first[None, :] <= (block + 1) * block_size - 1) & (
        last[None, :] >= block * block_size
    )
    inside = (first[None, :] >= block * block_size) & (
        last[None, :] <= (block + 1) * block_size - 1
    )
    read_selected = ((counts > 0).float() @ overlaps.float()) > 0
    full_selected = ((counts == TILE).float() @ inside.float()) > 0
    return read | read_selected, full | full_selected


def flex_moba_attention(
    q: Tensor, k: Tensor, v: Tensor, selected: Tensor, block_size: int, slopes: Tensor | None
) -> Tensor:
    """Attention of q, k, v [B, H, N, D] over each query's own block (keys j <= i) and its
    selected blocks (selected [B, H, N, K], ascending, -1 = empty), ALiBi as a score_mod."""
    n = q.shape[2]
    length = bucket(n)  # padding queries select nothing; padding keys follow every real query

    def padded(x: Tensor, value: float = 0.0) -> Tensor:
        return torch.nn.functional.pad(x, (0, 0, 0, length - n), value=value)

    q, k, v, selected = padded(q), padded(k), padded(v), mask_input(padded(selected, -1))
    slots = selected.shape[-1]

    def mask_mod(batch, head, q_idx, kv_idx):
        kv_block = kv_idx // block_size
        allowed = (kv_block == q_idx // block_size) & (kv_idx <= q_idx)
        for slot in range(slots):
            allowed = allowed | (selected[batch, head, q_idx, slot] == kv_block)
        return allowed

    read, full = _tile_grids(selected, block_size, length)
    block_mask = block_mask_from_tiles(read, full, mask_mod, length, length)
    score_mod = None
    if slopes is not None:  # natural order: slot indices are the positions
        slopes = mask_input(slopes.to(device=q.device, dtype=torch.float32))

        def score_mod(score, batch, head, q_idx, kv_idx):
            return score - slopes[head] * (q_idx - kv_idx)

    return flex(q, k, v, block_mask, score_mod)[:, :, :n]
