"""Softmax over the union of disjoint key sets, from each set's own softmax."""

from __future__ import annotations

import torch
from torch import Tensor


def merge_by_lse(results: list[tuple[Tensor, Tensor]], dtype: torch.dtype) -> Tensor:
    """One softmax from parts (out_p [B, H, N, D], lse_p [B, H, N]) over disjoint key sets.

    The union's log-sum-exp is lse = logsumexp_p(lse_p) and its output sum_p exp(lse_p - lse)
    out_p: exact, provided no key belongs to two parts and every query has a key in some part
    (the patterns always allow j = i).
    """
    if len(results) == 1:
        return results[0][0]
    lse = torch.logsumexp(torch.stack([part_lse for _, part_lse in results]), 0)
    merged = sum(
        torch.exp(part_lse - lse)[..., None] * out.to(lse.dtype) for out, part_lse in results
    )
    return merged.to(dtype)
