"""One accumulation policy for every kernel: sums, states, maxima and softmax statistics."""

from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half and single precision inputs, fp64 for fp64 inputs (the exact references)."""
    return torch.promote_types(dtype, torch.float32)
