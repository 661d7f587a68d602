"""RWKV-4's WKV operator, the chunk-parallel torch kernel (the CPU path, and the fallback on CUDA
where fla is missing); the definition and its state are in reference.py.

Every chunk of C positions runs the reference recurrence from an empty state, all chunks at once
(C vectorised steps over N/C chunks, never a loop over the sequence); a log-depth scan over the
chunk summaries gives the state entering each chunk; each output then merges the three parts
(carried state decayed tau steps, the chunk-local state, the bonus term) under one per-position
maximum. Exponents are differences of the form (exponent - running max), never
e^{+tau w} * e^{-tau w}, so decays up to any size stay finite. Memory is O(N D) per tensor (no
C x C pairwise tensor).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from longctx.core.dtypes import accumulation_dtype
from longctx.ops.head_parallel import across_heads
from longctx.ops.segment_policy import segment_length
from longctx.ops.wkv.reference import WkvState, empty_wkv_state, merge_states, push_position

# Positions per chunk of the chunk-parallel form used by the backends (speed only: any value
# gives the same results; 32 was the fastest of 16, 32 and 64 for fwd+bwd on the CPU).
WKV_CHUNK = 32
# Where host memory caps segments, no tensor of a segment passes this many elements (16 MiB in
# fp32, under glibc's 32 MiB largest mmap threshold): one pass over 16K positions at d=512 was
# slower on the CPU, its tensors faulted afresh on every call (rwkv's and aft_simple's faults per
# call: docs/results/bench_cpu/LOG.md, campaign 4).
HOST_SEGMENT_TENSOR_ELEMENTS = 1 << 22


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
        local = push_position(local, kt, vt, w_pos)
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
    n = k.shape[-2]
    segment = segment_length(n, per_position, chunk, HOST_SEGMENT_TENSOR_ELEMENTS, k.device)
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


def wkv_across_heads(
    k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: WkvState
) -> tuple[Tensor, WkvState]:
    """wkv_chunked in WKV_CHUNK chunks over k, v [B, H, N, Dh] with w, u [H, Dh] and a state of
    [B, H, Dh] tensors, the heads split across a CPU's threads (longctx.ops.head_parallel)."""
    return across_heads(wkv_chunked, (k, v, w, u, state, WKV_CHUNK), (1, 1, 0, 0, 1, None))


def wkv_flops(seq_len: int, channels: int) -> float:
    """Forward FLOPs of `wkv_chunked` with WKV_CHUNK (elementwise work; there are no matmuls).

    ~11 operations per position and channel for the chunk-local recurrence, ~20 to merge the
    carried, local and bonus terms, and 11 per merge of the log-depth scan over chunk summaries.
    """
    chunks = -(-seq_len // WKV_CHUNK)
    scan = 11 * math.ceil(math.log2(chunks + 1)) * chunks
    return float(channels * (31 * seq_len + scan))
