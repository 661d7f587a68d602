"""Causal linear attention (Katharopoulos et al. 2020), `attention=linear`.

o_i = phi(q_i)^T S_i / (phi(q_i)^T z_i + eps),
S_i = sum_{j<=i} phi(k_j) v_j^T, z_i = sum_{j<=i} phi(k_j).

The normaliser rides along with the values: with v' = [v | 1] one state S' = sum phi(k) v'^T
holds both S (first Dv columns) and z (last column), so numerator and denominator come out of
the same matrix products and the streaming state is one [B, H, Dk, Dv + 1] tensor.

Training uses the chunk-parallel form (`chunked_linear_attention`): per chunk of C positions,
state products K_c^T V'_c, an exclusive prefix sum over chunks, then Q_c S_prev plus the masked
intra-chunk term tril(Q_c K_c^T) V'_c. All chunks of a segment go through single batched matmuls
(no loop over chunks); segments of a few thousand positions run one after another with the state
carried, which keeps every intermediate small. The feature map, the normalisation and a
hand-written backward live in one autograd Function: memory is O(N (D + C) + (N/C) D^2) and no
full-size elementwise intermediate is made. Accumulation is fp32 (fp64 for fp64 inputs) whatever
the input dtype. Streaming single tokens use the recurrent form (`recurrent_linear_attention`);
longer steps use the chunk form from the carried state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from longctx.attention.base import Backend, HeadMixer, Mixer, ModelDims, State, split_qkv
from longctx.attention.registry import register
from longctx.core.dtypes import accumulation_dtype
from longctx.errors import ConfigError

# fast-transformers' value: keeps a zero denominator (possible with relu features) finite.
EPS = 1e-6
# Positions per kernel segment are capped so that no intermediate passes ~2 MB. Memory a call
# takes fresh from the OS is page-faulted again on every call (about 2.5 us per 4 KiB page on
# the 2-core CPU VM), and glibc returns big freed blocks to the OS: with 16 MB intermediates a
# 16K fwd+bwd took ~50K page faults per call, with 2 MB ones ~10K beyond its outputs, and ran
# about 25% faster (medians 270 -> 200 ms, interleaved in one process). The whole sequence at
# once was 1.5x slower still.
SEGMENT_ELEMENTS = 1 << 19


def elu_feature(x: Tensor) -> Tensor:
    return F.elu(x).add_(1)


# name -> (phi, phi' expressed through phi(x), so backward needs only the saved features).
FEATURE_MAPS = {
    "elu": (elu_feature, lambda phi: phi.clamp(max=1.0)),  # x + 1 for x > 0, e^x = phi otherwise
    "relu": (F.relu, lambda phi: (phi > 0).to(phi.dtype)),
}


def _segment_length(n: int, per_position: int, chunk: int) -> int:
    """Equal segments of whole chunks, as few as SEGMENT_ELEMENTS allows."""
    longest = max(1, SEGMENT_ELEMENTS // per_position // chunk) * chunk
    count = -(-n // longest)
    return -(-n // count // chunk) * chunk if count > 1 else longest


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
    # (1.7x faster than cumsum along a middle dimension, measured at 16K). Chunk c's state
    # never sees chunk c or later ones: their terms are multiplied by exact zeros, so future
    # positions cannot perturb past outputs even by rounding.
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
        segment = _segment_length(n, flat[0].shape[0] * max(dk, dv + 1, chunk), chunk)
        out, s = _ChunkedLinearAttention.apply(*flat, s0, chunk, feature, segment)
    return out.view(*lead, n, dv).to(v.dtype), s.view(*lead, dk, dv + 1)


def recurrent_linear_attention(
    q: Tensor, k: Tensor, v: Tensor, state: Tensor, feature: str = "elu"
) -> tuple[Tensor, Tensor]:
    """The same attention one position at a time:
    S' += phi(k_t) [v_t | 1]^T, o_t = phi(q_t)^T S'."""
    phi = FEATURE_MAPS[feature][0]
    dtype = accumulation_dtype(v.dtype)
    s = state.to(dtype)
    outputs = []
    for qt, kt, vt in zip(*(t.to(dtype).unbind(-2) for t in (q, k, v))):
        s = s + phi(kt)[..., :, None] * F.pad(vt, (0, 1), value=1.0)[..., None, :]
        o = (phi(qt)[..., :, None] * s).sum(-2)
        outputs.append(o[..., :-1] / (o[..., -1:] + EPS))
    return torch.stack(outputs, -2).to(v.dtype), s


class LinearAttention(HeadMixer):
    def __init__(self, dims: ModelDims, feature_map: str, chunk_size: int):
        super().__init__()
        self.n_head = dims.n_head
        self.head_dim = dims.head_dim
        self.feature = feature_map
        self.chunk_size = chunk_size
        self.qkv = nn.Linear(dims.d_model, 3 * dims.d_model, bias=dims.bias)
        self.out = nn.Linear(dims.d_model, dims.d_model, bias=dims.bias)

    def project(self, x: Tensor, start: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v [B, H, n, Dh]; linear attention has no positional scheme
        (order is causal sums)."""
        return split_qkv(self.qkv(x), self.n_head)

    def mix(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        state = q.new_zeros(*q.shape[:-2], self.head_dim, self.head_dim + 1)
        return chunked_linear_attention(q, k, v, state, self.chunk_size, self.feature)[0]

    def init_state(self, batch_size: int) -> State:
        weight = self.out.weight
        dtype = accumulation_dtype(weight.dtype)
        return weight.new_zeros(
            batch_size, self.n_head, self.head_dim, self.head_dim + 1, dtype=dtype
        )

    def step(self, x: Tensor, state: State, start: int) -> tuple[Tensor, State]:
        q, k, v = self.project(x, start)
        if x.shape[1] == 1:
            o, state = recurrent_linear_attention(q, k, v, state, self.feature)
        else:
            o, state = chunked_linear_attention(q, k, v, state, self.chunk_size, self.feature)
        return self.merge_heads(o), state


@register
class LinearBackend(Backend):
    name = "linear"

    @dataclass(frozen=True)
    class Options:
        feature_map: str = "elu"
        chunk_size: int = 64

    def validate(self) -> None:
        if self.options.feature_map not in FEATURE_MAPS:
            raise ConfigError(
                f"attention.feature_map={self.options.feature_map!r} is not valid; "
                f"choose one of {sorted(FEATURE_MAPS)}"
            )
        if self.options.chunk_size < 1:
            raise ConfigError(f"attention.chunk_size must be >= 1, got {self.options.chunk_size}")

    def mixer(self, layer: int) -> Mixer:
        return LinearAttention(self.dims, self.options.feature_map, self.options.chunk_size)

    def attention_flops(self, seq_len: int) -> float:
        c = self.options.chunk_size
        padded = -(-seq_len // c) * c
        dk = self.dims.head_dim
        e = dk + 1
        # Per head: K_c^T V'_c and Q_c S_prev (2 x 2 dk e per position), the full C x C
        # intra-chunk square Q_c K_c^T (2 C dk) and its product with V'_c (2 C e).
        per_head = padded * (4 * dk * e + 2 * c * dk + 2 * c * e)
        return float(self.dims.n_head * per_head)
