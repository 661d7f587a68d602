"""RWKV-4's WKV operator (also AFT-simple's running mean): the definition, one position at a time.

Per channel, with decay `w >= 0` and bonus `u`:

    y_t = (sum_{i<t} e^{k_i - (t-1-i) w} v_i + e^{u + k_t} v_t) / (same with every v = 1)

AFT-simple is the special case w = 0, u = 0: a running softmax-weighted mean of the values.

The state after some positions is (a, b, p) with e^p (a, b) = sum_i e^{k_i - (last-i) w} (v_i, 1):
`p` is the running maximum of the exponents (as in the reference RWKV-4 kernels), so every
exponential taken has an argument <= 0 and nothing overflows, whatever the key size. The maxima
are causal (they only see positions up to the one being produced) and are treated as constants by
autograd: every output is invariant to the stabiliser's value, so its gradient is exact without
differentiating through `max`. Every form of this package (this recurrence, the torch chunk
kernel, fla's fused recurrent kernel) keeps this state, so streaming may move between them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from longctx.core.dtypes import accumulation_dtype

# Exponent of an empty state: finite (unlike -inf) so empty - empty = 0, not NaN, and
# e^{EMPTY - anything finite} = 0. The RWKV-4 reference kernels use the same value.
EMPTY = -1e38

WkvState = tuple[Tensor, Tensor, Tensor]


def empty_wkv_state(shape: tuple[int, ...], like: Tensor) -> WkvState:
    """(a, b, p) for no positions yet, each of `shape` (the leading dims of k without N)."""
    dtype = accumulation_dtype(like.dtype)
    zeros = like.new_zeros(shape, dtype=dtype)
    return zeros, zeros.clone(), torch.full_like(zeros, EMPTY)


def merge_states(x: WkvState, y: WkvState, shift: Tensor | float) -> WkvState:
    """The state of x's positions followed, `shift`/w steps later,
    by y's positions (x decays by `shift`)."""
    a1, b1, p1 = x
    a2, b2, p2 = y
    older = p1 - shift
    with torch.no_grad():
        p = torch.maximum(older, p2)
    s1, s2 = torch.exp(older - p), torch.exp(p2 - p)
    return s1 * a1 + s2 * a2, s1 * b1 + s2 * b2, p


def push_position(state: WkvState, k: Tensor, v: Tensor, w: Tensor) -> WkvState:
    """The state after one more position (k, v): the old state decays by w."""
    a, b, p = state
    older = p - w
    with torch.no_grad():
        top = torch.maximum(older, k)
    s_old, s_new = torch.exp(older - top), torch.exp(k - top)
    return s_old * a + s_new * v, s_old * b + s_new, top


def wkv_recurrent(
    k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: WkvState
) -> tuple[Tensor, WkvState]:
    """The reference recurrence over k, v [..., N, D]; w, u broadcast to [..., D]."""
    dtype = accumulation_dtype(v.dtype)
    a, b, p = (s.to(dtype) for s in state)
    w, u = w.to(dtype), u.to(dtype)
    outputs = []
    for kt, vt in zip(k.to(dtype).unbind(-2), v.to(dtype).unbind(-2)):
        with torch.no_grad():
            top = torch.maximum(p, u + kt)
        old, new = torch.exp(p - top), torch.exp(u + kt - top)
        outputs.append((old * a + new * vt) / (old * b + new))
        a, b, p = push_position((a, b, p), kt, vt, w)
    return torch.stack(outputs, -2).to(v.dtype), (a, b, p)
