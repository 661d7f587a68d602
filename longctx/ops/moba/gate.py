"""MoBA's gate: which earlier, complete blocks each query attends to (shared by every kernel).

Gate score s(i, m) = q_i . mean_{j in block m} k_j over the complete blocks m before the query's
own block; the top_k highest are selected, ties to the earlier block. The scores are ranked as
q . (sum of the block's keys), which orders blocks like q . mean without a division's rounding.

Exactness: the key sums come from a fixed pairwise tree of elementwise additions (bit-identical
whichever call computes them), and identical blocks share the first one's score, so `forward`
(all blocks at once) and `step` (blocks completed chunk by chunk, other matmul shapes) select the
same blocks. The scores' dtype is the caller's: float64 for the torch kernel (each product of
fp32 values is exact there, so near-ties cannot flip between matmul shapes), float32 for the GPU
kernel (float64 is slow on GPUs; near-ties within fp32 rounding may then be broken differently
by forward and step). Everything here is tensor arithmetic with shapes from Python integers:
no host sync.
"""

from __future__ import annotations

import torch
from torch import Tensor

from longctx.ops.pieces import rows_per_piece


def block_key_sums(k: Tensor, block_size: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """Key sums [B, H, n_complete, D] (in `dtype`: the gate's) of the complete blocks of k.

    The gate ranks blocks by q . (sum of keys) = block_size * (q . mean key): the same order
    without the rounding of a division. Summed in at least fp32 by a fixed pairwise tree of
    elementwise additions, so each sum is bit-identical whatever call computes it (a reduction
    kernel may change its order with the shapes: one block at a time while streaming, all blocks
    in `forward`).
    """
    batch, heads, n, dim = k.shape
    complete = n // block_size
    x = k[:, :, : complete * block_size].reshape(batch, heads, complete, block_size, dim)
    width = 1 << (block_size - 1).bit_length()
    if width != block_size:  # zero-pad to a power of two: x + 0 is exact
        x = torch.nn.functional.pad(x, (0, 0, 0, width - block_size))
    x = x.to(torch.promote_types(k.dtype, torch.float32))
    while x.shape[3] > 1:
        half = x.shape[3] // 2
        x = x[:, :, :, :half] + x[:, :, :, half:]
    return x[:, :, :, 0].to(dtype)


def _top_blocks(scores: Tensor, slots: int) -> Tensor:
    """Selected blocks [..., slots] (ascending, -1 = none) of gate scores [..., cols] (-inf = not a
    candidate): the `slots` highest scores, ties going to the earlier block. Overwrites `scores`.

    `max` returns the first of equal maxima, so taking the maximum `slots` times, masking each
    pick, is exact top-k with the earlier-block tie rule (no tie needs resolving afterwards),
    which `topk` does not promise.
    """
    cols = scores.shape[-1]
    picks = []
    for _ in range(slots):
        value, index = scores.max(dim=-1, keepdim=True)
        picks.append(torch.where(value == float("-inf"), cols, index))
        scores.scatter_(-1, index, float("-inf"))
    index = torch.cat(picks, dim=-1).sort(dim=-1).values
    return torch.where(index == cols, -1, index)


def _first_identical_block(key_sums: Tensor) -> Tensor:
    """[B, H, n_complete]: for each block, the first block whose key sum is bit-identical
    to its own.

    A matmul may round identical columns differently (its kernel treats edge columns apart), which
    would turn an exact tie between identical blocks into an order that depends on the shapes, so
    `forward` and `step` could disagree. Identical blocks therefore share the score of the first.
    """
    same_width = {8: torch.int64, 4: torch.int32}[key_sums.element_size()]
    bits = key_sums.contiguous().view(same_width).to(torch.int64)
    # Odd multipliers from the golden ratio: a fixed hash of the exact bits (products wrap around);
    # a collision only costs the sharing, since `same` below compares the sums themselves.
    channel = torch.arange(bits.shape[-1], device=bits.device)
    mix = channel * -0x61C8864680B583EB + 0x632BE59BD9B4E019
    fingerprint = (bits * mix).sum(-1)
    first = (fingerprint[..., None, :] == fingerprint[..., :, None]).to(torch.uint8).argmax(-1)
    same = (key_sums.gather(2, first[..., None].expand_as(key_sums)) == key_sums).all(-1)
    return torch.where(same, first, torch.arange(key_sums.shape[2], device=key_sums.device))


def select_blocks(q: Tensor, key_sums: Tensor, q_start: int, block_size: int, top_k: int) -> Tensor:
    """Selected blocks [B, H, n, min(top_k, n_complete)] of queries q
    at positions q_start..q_start+n-1.

    Ascending block indices; -1 marks an empty slot (fewer earlier blocks than top_k).
    """
    batch, heads, n, _ = q.shape
    complete = key_sums.shape[2]
    slots = min(top_k, complete)
    selected = torch.full((batch, heads, n, slots), -1, dtype=torch.long, device=q.device)
    if slots == 0:
        return selected
    first_identical = _first_identical_block(key_sums)
    rows = rows_per_piece(batch * heads * complete)
    for first in range(0, n, rows):
        last = min(n, first + rows)
        query_block = torch.arange(q_start + first, q_start + last, device=q.device) // block_size
        # Only blocks before the chunk's last query block can be candidates of any of its rows.
        cols = min(complete, (q_start + last - 1) // block_size)
        if cols == 0:
            continue
        scores = q[:, :, first:last].detach().to(key_sums.dtype) @ key_sums[:, :, :cols].mT
        scores = scores.gather(-1, first_identical[:, :, None, :cols].expand_as(scores))
        candidate = torch.arange(cols, device=q.device)[None, :] < query_block[:, None]
        scores.masked_fill_(~candidate, float("-inf"))
        selected[:, :, first:last, : min(slots, cols)] = _top_blocks(scores, min(slots, cols))
    return selected
