"""Block layouts for the sparse engine: which key blocks each query block reads.

Every builder returns a `BlockLayout` whose tiles cover the part's predicate `allowed(i, j)`
(the mask inside the tiles is exact); they never look at an N x N mask. Four shapes cover the
whole family:
- `band_layout`: natural order, query block r reads a contiguous range of key blocks
  (sliding windows, Liu local blocks, BlockBERT shifted blocks);
- `residue_layout`: positions regrouped by residue mod a stride, so the keys i - stride*m of a
  dilated window or a strided head become a contiguous causal window;
- `summary_layout`: the keys are the Sparse Transformer "fixed" summary columns, in order;
- `prefix_layout`: the keys are the first positions (Longformer global tokens).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn import functional as F

from longctx.ops.sparse.engine import BlockLayout, PositionPredicate, make_layout

# Tile size of the CPU engine: smaller tiles make more, smaller matmuls; larger ones compute more
# masked pairs at a window's edges (ceil((W - 1) / b) + 1 blocks per query block). 64 sits
# between the two for the default windows (docs/results/bench_cpu/LOG.md,
# campaign 4).
ENGINE_BLOCK = 64

KeyBound = Callable[[Tensor], Tensor]  # query positions -> a monotone bound on their key positions


def engine_block(extent: int) -> int:
    """ENGINE_BLOCK, or a smaller power of two covering a pattern
    that repeats every `extent` keys."""
    return min(ENGINE_BLOCK, 1 << max(extent - 1, 0).bit_length())


def _slots(members: Tensor, block: int) -> Tensor:
    """Positions padded with -1 to whole blocks (at least one block)."""
    size = max(-(-len(members) // block), 1) * block
    return F.pad(members, (0, size - len(members)), value=-1)


def _row_ends(n: int, block: int) -> tuple[Tensor, Tensor]:
    """First and last valid query position of each natural query block."""
    starts = torch.arange(0, max(n, 1), block)
    return starts, (starts + block - 1).clamp(max=n - 1)


def band_layout(
    n: int, block: int, first_key: KeyBound, last_key: KeyBound, allowed: PositionPredicate
) -> BlockLayout:
    """Natural order; query block r reads the key blocks
    from first_key(first row) to last_key(last row).

    Both bounds must be non-decreasing in the query position, so the block's first and last
    rows bound every row of it.
    """
    pos = _slots(torch.arange(n), block)
    starts, ends = _row_ends(n, block)
    first = first_key(starts).clamp_min(0) // block
    last = last_key(ends).clamp(max=n - 1)
    last = torch.where(last >= 0, last // block, -1)
    return make_layout(pos, pos, first, last, block, allowed)


def residue_layout(
    n: int, block: int, stride: int, window: int | None, allowed: PositionPredicate
) -> BlockLayout:
    """Positions regrouped by residue mod `stride`,
    each class contiguous and padded to whole blocks.

    In a class, key i - stride*m sits m slots before query i, so a dilated window of `window`
    keys is a plain window of `window` slots and `window=None` (every m) is causal attention.
    """
    slots, first, last, offset = [], [], [], 0
    for residue in range(min(stride, n)):
        members = _slots(torch.arange(residue, n, stride), block)
        blocks = torch.arange(len(members) // block)
        lowest = (
            torch.zeros_like(blocks)
            if window is None
            else (blocks * block - (window - 1)).clamp_min(0) // block
        )
        slots.append(members)
        first.append(offset + lowest)
        last.append(offset + blocks)
        offset += len(blocks)
    pos = torch.cat(slots)
    return make_layout(pos, pos, torch.cat(first), torch.cat(last), block, allowed)


def summary_layout(
    n: int, block: int, stride: int, summary: int, allowed: PositionPredicate
) -> BlockLayout:
    """Natural queries; keys are the positions j with j mod stride >= stride - summary, in order.

    Query block r reads the summary blocks up to the last summary position <= its last row.
    """
    positions = torch.arange(n)
    members = positions[positions % stride >= stride - summary]
    starts, ends = _row_ends(n, block)
    reachable = torch.searchsorted(
        members, ends, right=True
    )  # summary keys <= the block's last row
    last = torch.where(reachable > 0, (reachable - 1) // block, -1)
    return make_layout(
        _slots(positions, block),
        _slots(members, block),
        torch.zeros_like(last),
        last,
        block,
        allowed,
    )


def prefix_layout(n: int, block: int, count: int, allowed: PositionPredicate) -> BlockLayout:
    """Natural queries; keys are positions 0..count-1, read by every query block."""
    members = torch.arange(min(count, n))
    starts, _ = _row_ends(n, block)
    last = torch.full_like(starts, (len(members) - 1) // block)
    return make_layout(
        _slots(torch.arange(n), block),
        _slots(members, block),
        torch.zeros_like(last),
        last,
        block,
        allowed,
    )
