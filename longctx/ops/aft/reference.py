"""AFT's weighted mean as written, for one query: the streaming form for a single token, and the
definition the blocked engine (blocked.py) computes for every query at once.
"""

from __future__ import annotations

import torch
from torch import Tensor

from longctx.core.dtypes import accumulation_dtype
from longctx.ops.aft.blocked import BiasFn
from longctx.ops.wkv.reference import WkvState, merge_states


def aft_one_query(k: Tensor, v: Tensor, bias: BiasFn, prefix: WkvState) -> Tensor:
    """The weighted mean for one query, the last of keys k, v [B, H, L, Dh], all of which it reaches
    with learned bias (the streaming cache), plus `prefix` for older keys: [B, H, 1, Dh]."""
    dtype = accumulation_dtype(v.dtype)
    with torch.autocast(k.device.type, enabled=False):
        cols = torch.arange(k.shape[-2], device=k.device)[None]
        w = bias(cols[:, -1:], cols)[:, 0].to(dtype)  # [Hb, 1, L]
        logits = k.to(dtype) + w.transpose(-1, -2)
        a, b, p = (s.to(dtype) for s in prefix)
        with torch.no_grad():
            top = torch.maximum(logits.amax(-2), p)
        near, old = torch.exp(logits - top.unsqueeze(-2)), torch.exp(p - top)
        y = ((near * v.to(dtype)).sum(-2) + old * a) / (near.sum(-2) + old * b)
    return y.unsqueeze(-2).to(v.dtype)


def prefix_after(prefix: WkvState, k: Tensor, v: Tensor) -> WkvState:
    """`prefix` extended by keys k, v [B, H, m, Dh] with bias 0 (keys leaving the band)."""
    if k.shape[-2] == 0:
        return prefix
    dtype = prefix[0].dtype
    k, v = k.to(dtype), v.to(dtype)
    with torch.no_grad():
        top = k.amax(-2)
    e = torch.exp(k - top.unsqueeze(-2))
    return merge_states(prefix, ((e * v).sum(-2), e.sum(-2), top), 0.0)
