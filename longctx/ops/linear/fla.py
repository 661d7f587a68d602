"""Causal linear attention on flash-linear-attention's chunked Triton kernel (fla-core's
`chunk_linear_attn`), the CUDA kernel of `attention=linear`.

fla's kernel computes unnormalised sums o_t = scale * q_t^T sum_{j<=t} k_j v_j^T; its own
normalised form divides by q^T z + 1e-10, while this project's eps is 1e-6 (reference.py). So the
kernel runs with scale 1, normalize=False, on the features phi(q), phi(k) and on the values with
a ones column, v' = [v | 1]: the last column of its output is then the denominator phi(q)^T z and
its state is the project's (S | z), the same [B, H, Dk, Dv + 1] tensor every other form keeps.
The feature map and the division run in torch around the kernel (autograd differentiates them);
the kernel's own backward gives the gradients of the features, of v' and of the entering state.

Everything goes to the kernel in the accumulation dtype (fp32 for half and single precision,
core.dtypes), so its chunk states and the carried state are fp32 as in the torch kernel; fla's
chunk length is its own (64), `attention.chunk_size` applies to the torch kernel only.
fla-core is an optional dependency (`pip install -e '.[gpu]'`): it is imported on first use.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from longctx.core.dtypes import accumulation_dtype
from longctx.ops.linear.reference import EPS, FEATURE_MAPS


def fla_linear_attention(
    q: Tensor, k: Tensor, v: Tensor, state: Tensor | None, feature: str = "elu"
) -> tuple[Tensor, Tensor]:
    """Normalised causal linear attention of q, k [B, H, N, Dk] (before the feature map) and
    v [B, H, N, Dv] from `state` (S | z) [B, H, Dk, Dv + 1] (None: no earlier positions).

    Returns (out [B, H, N, Dv] in v's dtype, the state after N in the accumulation dtype).
    """
    from fla.ops.linear_attn import chunk_linear_attn

    phi = FEATURE_MAPS[feature][0]
    dtype = accumulation_dtype(v.dtype)
    with torch.autocast(q.device.type, enabled=False):
        # fla's layout is [B, N, H, D]; the feature map writes its output in that order.
        features = [phi(t.to(dtype).transpose(1, 2)) for t in (q, k)]
        values = F.pad(v.to(dtype).transpose(1, 2), (0, 1), value=1.0)
        sums, final = chunk_linear_attn(
            *features,
            values,
            scale=1.0,
            initial_state=None if state is None else state.to(dtype),
            output_final_state=True,
            normalize=False,
        )
        out = sums[..., :-1] / (sums[..., -1:] + EPS)
    return out.transpose(1, 2).to(v.dtype), final
