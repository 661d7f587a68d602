"""Causal linear attention, the chunk-parallel torch kernel (the CPU path, and the fallback on
CUDA where fla is missing).

Per chunk of C positions: state products K_c^T V'_c, an exclusive prefix sum over chunks, then
Q_c S_prev plus the masked intra-chunk term tril(Q_c K_c^T) V'_c, with V' = [V | 1] carrying the
normaliser (reference.py). All chunks of a segment go through single batched matmuls (no loop over
chunks). Where host memory caps segments (segment_policy.py) the sequence runs as segments of a
few thousand positions with the state carried. The feature map, the normalisation and a
hand-written backward live in one autograd Function: memory is O(N (D + C) + (N/C) D^2) and no
full-size elementwise intermediate is made. Accumulation is fp32 (fp64 for fp64 inputs) whatever
the input dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from longctx.core.dtypes import accumulation_dtype
from longctx.ops.linear.reference import EPS, FEATURE_MAPS
from longctx.ops.segment_policy import segment_length

# Where host memory caps segments, no intermediate of a segment passes this many elements (2 MiB
# in fp32): tuned on the CPU, where segments this small beat both 16 MiB ones and one pass over
# 16K positions because fewer of their pages are faulted afresh per call (linear's faults per call:
# docs/results/bench_cpu/LOG.md, campaign 4).
HOST_SEGMENT_TENSOR_ELEMENTS = 1 << 19


def _upper(chunk: int, device) -> Tensor:
    return torch.ones(chunk, chunk, dtype=torch.bool, device=device).triu_(1)


def _strictly_lower(n: int, like: Tensor) -> Tensor:
    """[n, n] with ones below the diagonal: row c sums the chunks before c."""
    return torch.ones(n, n, dtype=like.dtype, device=like.device).tril_(-1)


def _segment_forward(q: Tensor, k: Tensor, v: Tensor, s0: Tensor, chunk: int, out: Tensor):
    """One segment: features q, k [G, n, Dk], values v [G, n, Dv], state (S | z) [G, Dk, Dv + 1].

    Writes the output into `out` [G, n, Dv]; returns the state after the segment and what its
    backward needs (besides the output).
    """
    g, n, dk = q.shape
    dv = v.shape[-1]
    e = dv + 1
    nc = -(-n // chunk)
    pad = nc * chunk - n
    # Zero-padded tail: zero key features add nothing to the state, padded rows are dropped.
    # (Only the tail is zeroed: a full zero fill is one more pass over the segment.)
    v1 = q.new_empty(g, n + pad, e)
    v1[:, :n, :dv] = v
    v1[:, :n, dv] = 1
    v1[:, n:] = 0
    # Contiguous (and padded) features: backward re-reads them as chunk views.
    q, k = (F.pad(t, (0, 0, 0, pad)) if pad else t.contiguous() for t in (q, k))
    qc, kc, vc = (t.view(g * nc, chunk, t.shape[-1]) for t in (q, k, v1))
    kv = torch.bmm(kc.transpose(1, 2), vc).view(g, nc, dk, e)
    # Exclusive prefix over chunks as one product with a strictly lower-triangular 0/1 matrix
    # (one GEMM; a cumsum along a middle dimension was slower on the CPU). Chunk c's state never
    # sees chunk c or later ones: their terms are multiplied by exact zeros, so future positions
    # cannot perturb past outputs even by rounding.
    s_excl = torch.matmul(_strictly_lower(nc, kv), kv.view(g, nc, dk * e)).view_as(kv)
    s_excl += s0[:, None]
    s_final = s_excl[:, -1] + kv[:, -1]
    scores = torch.bmm(qc, kc.transpose(1, 2)).masked_fill_(_upper(chunk, q.device), 0)
    o = torch.bmm(scores, vc).baddbmm_(qc, s_excl.view(g * nc, dk, e)).view(g, n + pad, e)
    den = o[:, :n, dv:] + EPS
    torch.div(o[:, :n, :dv], den, out=out)
    return s_final, (q, k, v1, s_excl, scores, den)


def _segment_backward(saved, out: Tensor, d_out: Tensor, d_state: Tensor, chunk: int):
    """Gradients of one segment's features, values and entering state, given its output and the
    gradients of that output and of the state it hands on."""
    q, k, v1, s_excl, scores, den = saved
    g, n_pad, dk = q.shape
    n = out.shape[1]
    e = v1.shape[-1]
    dv = e - 1
    nc = n_pad // chunk
    # Gradient of [num | den] from out = num / den.
    d_o = q.new_empty(g, n_pad, e)
    d_o[:, n:] = 0
    torch.div(d_out, den, out=d_o[:, :n, :dv])
    d_o[:, :n, dv] = -(d_o[:, :n, :dv] * out).sum(-1)
    qc, kc, vc, doc = (t.view(g * nc, chunk, t.shape[-1]) for t in (q, k, v1, d_o))
    # r[c] = dL/d(state after chunk c) = d_state + sum_{c' > c} Q_c'^T dO_c'.
    q_do = torch.bmm(qc.transpose(1, 2), doc).view(g, nc, dk, e)
    r = torch.matmul(_strictly_lower(nc, q_do).T, q_do.view(g, nc, dk * e)).view_as(q_do)
    r += d_state[:, None]
    d_s0 = r[:, 0] + q_do[:, 0]
    r = r.view(g * nc, dk, e)
    d_scores = torch.bmm(doc, vc.transpose(1, 2)).masked_fill_(_upper(chunk, q.device), 0)
    dq = torch.bmm(d_scores, kc).baddbmm_(doc, s_excl.view(g * nc, dk, e).transpose(1, 2))
    dk_ = torch.bmm(d_scores.transpose(1, 2), qc).baddbmm_(vc, r.transpose(1, 2))
    dv_ = torch.bmm(scores.transpose(1, 2), doc).baddbmm_(kc, r)
    grads = (
        dq.view(g, n_pad, dk)[:, :n],
        dk_.view(g, n_pad, dk)[:, :n],
        dv_.view(g, n_pad, e)[:, :n, :dv],
    )
    return grads, d_s0


class _ChunkedLinearAttention(torch.autograd.Function):
    """out = phi(q)^T S / (phi(q)^T z + eps) for q, k [G, N, Dk], v [G, N, Dv] from state s0.

    The sequence runs in segments (the state carried between them); the feature map and the
    normalisation are part of the kernel, so no full-size intermediate is ever made.
    """

    @staticmethod
    def forward(ctx, xq, xk, v, s0, chunk: int, feature: str, segment: int):
        phi = FEATURE_MAPS[feature][0]
        out = v.new_empty(v.shape)
        state, saved = s0, []
        for lo in range(0, xq.shape[1], segment):
            part = slice(lo, lo + segment)
            q, k = phi(xq[:, part]), phi(xk[:, part])
            state, tensors = _segment_forward(q, k, v[:, part], state, chunk, out[:, part])
            saved.extend(tensors)
        ctx.save_for_backward(out, *saved)
        ctx.config = (chunk, feature, segment)
        return out, state

    @staticmethod
    def backward(ctx, d_out, d_state):
        chunk, feature, segment = ctx.config
        slope = FEATURE_MAPS[feature][1]
        out, *saved = ctx.saved_tensors
        n_segments = len(saved) // 6
        (g, n, _), dk = out.shape, saved[0].shape[2]
        dxq, dxk = d_out.new_empty(g, n, dk), d_out.new_empty(g, n, dk)
        dv = d_out.new_empty(d_out.shape)
        for i in reversed(range(n_segments)):
            part = slice(i * segment, (i + 1) * segment)
            tensors = saved[6 * i : 6 * i + 6]
            (dq, dk_, dv[:, part]), d_state = _segment_backward(
                tensors, out[:, part], d_out[:, part], d_state, chunk
            )
            m = dq.shape[1]
            torch.mul(dq, slope(tensors[0][:, :m]), out=dxq[:, part])
            torch.mul(dk_, slope(tensors[1][:, :m]), out=dxk[:, part])
        return dxq, dxk, dv, d_state, None, None, None


def chunked_linear_attention(
    q: Tensor, k: Tensor, v: Tensor, state: Tensor, chunk: int, feature: str = "elu"
) -> tuple[Tensor, Tensor]:
    """Normalised causal linear attention of q, k [..., N, Dk] (before the feature map) and v.

    `state` [..., Dk, Dv + 1] holds (S | z) from earlier positions. Returns (out, new state);
    out has the dtype of v, the state is kept in fp32 (fp64 for fp64 inputs).
    """
    lead, (n, dk), dv = q.shape[:-2], q.shape[-2:], v.shape[-1]
    dtype = accumulation_dtype(v.dtype)
    with torch.autocast(q.device.type, enabled=False):
        flat = [t.to(dtype).reshape(-1, n, t.shape[-1]) for t in (q, k, v)]
        s0 = state.to(dtype).reshape(-1, dk, dv + 1)
        per_position = flat[0].shape[0] * max(dk, dv + 1, chunk)
        segment = segment_length(n, per_position, chunk, HOST_SEGMENT_TENSOR_ELEMENTS, q.device)
        out, s = _ChunkedLinearAttention.apply(*flat, s0, chunk, feature, segment)
    return out.view(*lead, n, dv).to(v.dtype), s.view(*lead, dk, dv + 1)
