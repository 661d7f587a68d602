"""RWKV-4's WKV on flash-linear-attention's fused recurrent Triton kernel (fla-core's
`fused_recurrent_rwkv4`), the CUDA kernel of `attention=rwkv`.

fla's kernel is RWKV-4's own operator, not a mapping onto another one: per channel the same
stabilised recurrence as reference.py (running maximum `eps` of the exponents, bonus `u` for the
current position, decay applied as w + eps with fla's w = -exp(log_decay)), over a state
(alpha, beta, eps) that is the project's (a, b, p). It takes the log-decay (RWKV-4's
`time_decay`; the decay is exp(log_decay)) and differentiates it in its own backward. One program
runs a block of channels of one sequence through all N positions in a single launch, so the work
is sequential in N and parallel over batch x channels, as in RWKV-4's reference CUDA kernel.

Inputs go to the kernel in the accumulation dtype (fp32 for half and single precision,
core.dtypes): the kernel stores its output and every intermediate state in its inputs' dtype.
fla-core is an optional dependency (`pip install -e '.[gpu]'`): it is imported on first use.
"""

from __future__ import annotations

import torch
from torch import Tensor

from longctx.core.dtypes import accumulation_dtype
from longctx.ops.wkv.reference import WkvState, empty_wkv_state


def fla_wkv(
    k: Tensor, v: Tensor, log_decay: Tensor, u: Tensor, state: WkvState | None
) -> tuple[Tensor, WkvState]:
    """WKV over k, v [B, ..., N, D] with decay exp(log_decay) and bonus u (both broadcast to
    [..., D]) from `state` (None: no earlier positions); returns (y, state after N) like
    `wkv_chunked`, y in v's dtype and the state in the accumulation dtype."""
    from fla.ops.rwkv4 import fused_recurrent_rwkv4

    batch, *rest, n, d = k.shape
    dtype = accumulation_dtype(v.dtype)
    if state is None:
        state = empty_wkv_state((batch, *rest, d), k)

    def channels_last(x: Tensor) -> Tensor:  # [B, ..., N, D] -> fla's [B, N, C]
        return x.to(dtype).movedim(-2, 1).reshape(batch, n, -1)

    def per_channel(x: Tensor) -> Tensor:  # broadcast to [..., D], flattened to fla's [C]
        return x.to(dtype).expand(*rest, d).reshape(-1)

    with torch.autocast(k.device.type, enabled=False):
        stacked = torch.stack([s.to(dtype) for s in state], 1).view(batch, 3, 1, -1)
        y, final = fused_recurrent_rwkv4(
            per_channel(log_decay), per_channel(u), channels_last(k), channels_last(v), stacked
        )
    y = y.view(batch, n, *rest, d).movedim(1, -2)
    # A copy: the kernel's final state is a view of every position's state, kept for backward.
    a, b, p = final.view(batch, 3, *rest, d).clone().unbind(1)
    return y.to(v.dtype), (a, b, p)
