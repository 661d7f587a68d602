"""Causal linear attention (Katharopoulos et al. 2020): the definition, one position at a time.

    o_i = phi(q_i)^T S_i / (phi(q_i)^T z_i + eps),
    S_i = sum_{j<=i} phi(k_j) v_j^T,  z_i = sum_{j<=i} phi(k_j).

The normaliser rides along with the values: with v' = [v | 1] one state S' = sum phi(k) v'^T
holds S (first Dv columns) and z (last column). Every form of this package (this loop, the torch
chunk kernel, fla's Triton kernel) keeps that one [..., Dk, Dv + 1] state, so streaming may move
from one form to another between calls. This loop is what the fast forms are held to, and the
streaming form for a single token.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from longctx.core.dtypes import accumulation_dtype

# fast-transformers' value: keeps a zero denominator (possible with relu features) finite.
EPS = 1e-6


def elu_feature(x: Tensor) -> Tensor:
    return F.elu(x).add_(1)


# name -> (phi, phi' expressed through phi(x), so a backward needs only the saved features).
FEATURE_MAPS = {
    "elu": (elu_feature, lambda phi: phi.clamp(max=1.0)),  # x + 1 for x > 0, e^x = phi otherwise
    "relu": (F.relu, lambda phi: (phi > 0).to(phi.dtype)),
}


def recurrent_linear_attention(
    q: Tensor, k: Tensor, v: Tensor, state: Tensor, feature: str = "elu"
) -> tuple[Tensor, Tensor]:
    """q, k [..., N, Dk] (before the feature map), v [..., N, Dv] from `state` (S | z):
    S' += phi(k_t) [v_t | 1]^T, o_t = phi(q_t)^T S' normalised. Returns (out, state after N)."""
    phi = FEATURE_MAPS[feature][0]
    dtype = accumulation_dtype(v.dtype)
    s = state.to(dtype)
    outputs = []
    for qt, kt, vt in zip(*(t.to(dtype).unbind(-2) for t in (q, k, v))):
        s = s + phi(kt)[..., :, None] * F.pad(vt, (0, 1), value=1.0)[..., None, :]
        o = (phi(qt)[..., :, None] * s).sum(-2)
        outputs.append(o[..., :-1] / (o[..., -1:] + EPS))
    return torch.stack(outputs, -2).to(v.dtype), s
