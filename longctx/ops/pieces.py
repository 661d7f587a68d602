"""How kernels go through long sequences in pieces: one budget for what a piece materialises, and
one way to cut a tensor into pieces.

TRANSIENT_SCORES bounds the scores (query x key entries, summed over batch and heads) that a
kernel holds at once when it takes its queries a piece at a time: the dense masks of streaming
steps, Transformer-XL's groups of segments, moba's gate. A piece's temporaries are a few copies
of that many numbers (64 MiB per fp32 copy), small beside the activations of the lengths where
pieces matter, and large enough that each piece is a few big operations rather than many small
ones. Results never depend on the piece size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

TRANSIENT_SCORES = 1 << 24


def rows_per_piece(entries_per_row: int) -> int:
    """Rows (queries, segments) per piece when each row materialises `entries_per_row` scores."""
    return max(1, TRANSIENT_SCORES // max(entries_per_row, 1))


def split_into_pieces(x: Tensor, sizes: int | Sequence[int], dim: int = 0) -> tuple[Tensor, ...]:
    """x cut along `dim` into consecutive pieces (of `sizes`, or of equal size `sizes`).

    Split, not slice: the backward of a slice `x[a:b]` writes the piece's gradient into a
    zero-filled tensor of x's full size, once per piece, so cutting a sequence into k slices
    costs k full-size gradients in backward (zeros and memory); the backward of one `split` joins
    the pieces' gradients into a single one. Every kernel that walks a sequence in pieces with
    gradients cuts it here.
    """
    return torch.split(x, sizes if isinstance(sizes, int) else list(sizes), dim=dim)
