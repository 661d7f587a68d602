"""Numerically stable decayed exponential averages: RWKV-4's WKV operator (also AFT-simple).

Per channel, with decay `w >= 0` and bonus `u`:

    y_t = (sum_{i<t} e^{k_i - (t-1-i) w} v_i + e^{u + k_t} v_t) / (same with every v = 1)

AFT-simple is the special case w = 0, u = 0: a running softmax-weighted mean of the values.

The state after some positions is (a, b, p) with e^p (a, b) = sum_i e^{k_i - (last-i) w} (v_i, 1):
`p` is the running maximum of the exponents (as in the reference RWKV-4 kernels), so every
exponential taken below has an argument <= 0 and nothing overflows, whatever the key size.
The maxima are causal (they only see positions up to the one being produced) and are treated
as constants by autograd: every output is invariant to the stabiliser's value, so its gradient
is exact without differentiating through `max`.

Two forms that agree to rounding:
- `wkv_recurrent`: one position at a time, the reference recurrence (streaming decode);
- `wkv_chunked`: the chunk-parallel training form. Every chunk of C positions runs the same
  recurrence from an empty state, all chunks at once (C vectorised steps over N/C chunks, never
  a loop over the sequence); a log-depth scan over the chunk summaries gives the state entering
  each chunk; each output then merges the three parts (carried state decayed tau steps, the
  chunk-local state, the bonus term) under one per-position maximum. Exponents are differences
  of the form (exponent - running max), never e^{+tau w} * e^{-tau w}, so decays up to any
  size stay finite. Memory is O(N D) per tensor (no C x C pairwise tensor).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from longctx.core.dtypes import accumulation_dtype

# Exponent of an empty state: finite (unlike -inf) so empty - empty = 0, not NaN, and
# e^{EMPTY - anything finite} = 0. The RWKV-4 reference kernels use the same value.
EMPTY = -1e38

WkvState = tuple[Tensor, Tensor, Tensor]

# Positions per chunk of the chunk-parallel form used by the backends (fastest of 16/32/64
# measured fwd+bwd on CPU; any value gives the same results).
WKV_CHUNK = 32
# Positions per pass are capped so that no tensor passes ~16 MB: glibc serves blocks over 32 MB
# with fresh mmaps that are page-faulted again on every call (2.5x slower at N=16K, d=512, when
# the whole sequence ran at once).
SEGMENT_ELEMENTS = 1 << 22


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


def _push(state: WkvState, k: Tensor, v: Tensor, w: Tensor) -> WkvState:
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
        a, b, p = _push((a, b, p), kt, vt, w)
    return torch.stack(outputs, -2).to(v.dtype), (a, b, p)


def exclusive_state_scan(init: WkvState, summaries: WkvState, span: Tensor | float) -> WkvState:
    """States entering each chunk and the final state: [..., nc + 1, D] from summaries [..., nc, D].

    Hillis-Steele inclusive scan over [init, chunk 0, ..., chunk nc-1], consecutive entries
    `span` (= C w; 0 for undecayed sums) apart; entry j only ever merges with earlier entries, so
    it stays causal.
    """
    parts = [torch.cat((s0.unsqueeze(-2), s), -2) for s0, s in zip(init, summaries)]
    length = parts[0].shape[-2]
    offset = 1
    while offset < length:
        head = [x[..., :offset, :] for x in parts]
        merged = merge_states(
            tuple(x[..., :-offset, :] for x in parts),
            tuple(x[..., offset:, :] for x in parts),
            offset * span,
        )
        parts = [torch.cat((h, m), -2) for h, m in zip(head, merged)]
        offset *= 2
    return tuple(parts)


def _wkv_whole_chunks(k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: WkvState, c: int):
    """WKV over N = nc * c positions in chunks of c (inputs already in the compute dtype)."""
    *lead, n, d = k.shape
    nc = n // c
    kc, vc = k.reshape(*lead, nc, c, d), v.reshape(*lead, nc, c, d)
    w_pos = w.unsqueeze(-2)  # broadcast over the chunk axis
    # Chunk-local recurrence from an empty state, all chunks at once;
    # keep the state before each tau.
    # (unbind, not indexing: its backward stacks the slices once instead of zero-filling per slice.)
    local = empty_wkv_state((*lead, nc, d), k)
    before = []
    for kt, vt in zip(kc.unbind(-2), vc.unbind(-2)):
        before.append(local)
        local = _push(local, kt, vt, w_pos)
    starts = exclusive_state_scan(state, local, c * w_pos)
    a_in, b_in, p_in = (s[..., :-1, :].unsqueeze(-2) for s in starts)  # [..., nc, 1, d]
    a_loc, b_loc, p_loc = (torch.stack(parts, -2) for parts in zip(*before))  # [..., nc, c, d]
    steps = torch.arange(c, device=k.device, dtype=k.dtype)[:, None]
    carried = p_in - steps * w_pos.unsqueeze(-2)
    bonus = u.unsqueeze(-2).unsqueeze(-2) + kc
    with torch.no_grad():
        top = torch.maximum(torch.maximum(carried, p_loc), bonus)
    s_in, s_loc, s_new = torch.exp(carried - top), torch.exp(p_loc - top), torch.exp(bonus - top)
    y = (s_in * a_in + s_loc * a_loc + s_new * vc) / (s_in * b_in + s_loc * b_loc + s_new)
    final = tuple(s[..., -1, :] for s in starts)
    return y.reshape(*lead, n, d), final


def wkv_chunked(
    k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: WkvState, chunk: int
) -> tuple[Tensor, WkvState]:
    """The chunk-parallel form over k, v [..., N, D] from `state`; returns (y, state after N).

    N need not be a multiple of `chunk`: the remainder runs as one shorter chunk.
    """
    dtype = accumulation_dtype(v.dtype)
    per_position = k[..., 0, :].numel()  # elements of one position across batch and heads
    longest = max(1, SEGMENT_ELEMENTS // per_position // chunk) * chunk
    count = -(-k.shape[-2] // longest)
    segment = -(-k.shape[-2] // count // chunk) * chunk  # equal segments of whole chunks
    with torch.autocast(k.device.type, enabled=False):
        w32, u32 = w.to(dtype), u.to(dtype)
        state = tuple(s.to(dtype) for s in state)
        outputs = []
        # split, not slicing: its backward concatenates instead of zero-filling full-size gradients.
        for ks, vs in zip(k.to(dtype).split(segment, -2), v.to(dtype).split(segment, -2)):
            m = ks.shape[-2]
            whole = m - m % chunk  # the remainder (last segment only) runs as one shorter chunk
            sizes = [whole, m - whole] if 0 < whole < m else [m]
            for kp, vp in zip(ks.split(sizes, -2), vs.split(sizes, -2)):
                y, state = _wkv_whole_chunks(kp, vp, w32, u32, state, min(chunk, kp.shape[-2]))
                outputs.append(y)
        y = torch.cat(outputs, -2) if len(outputs) > 1 else outputs[0]
    return y.to(v.dtype), state


def wkv_flops(seq_len: int, channels: int) -> float:
    """Forward FLOPs of `wkv_chunked` with WKV_CHUNK (elementwise work; there are no matmuls).

    ~11 operations per position and channel for the chunk-local recurrence, ~20 to merge the
    carried, local and bonus terms, and 11 per merge of the log-depth scan over chunk summaries.
    """
    chunks = -(-seq_len // WKV_CHUNK)
    scan = 11 * math.ceil(math.log2(chunks + 1)) * chunks
    return float(channels * (31 * seq_len + scan))
