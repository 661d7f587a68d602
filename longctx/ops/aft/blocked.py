"""The blocked engine of the biased AFT variants (aft_full, aft_local, aft_conv), torch.

Weighted means Y_t = sum_{t'<=t} e^{K_t' + w[t,t']} V_t' / sum_{t'<=t} e^{K_t' + w[t,t']} per
channel, for a position bias w with learned values inside a band of lags (all lags for aft_full)
and 0 outside it. Positions are cut into blocks of C:
- keys older than the band (bias 0) arrive as a prefix state from a log-depth scan over block
  summaries (in the lagged form "prefix + band with e^w", never the paper's "all keys +
  (e^w - 1) * band" correction, which cancels catastrophically when w is very negative);
- each earlier in-band key block J enters through two matmuls (numerator, denominator) of
  e^{w - beta} with e^{K_J - mu_J} (V_J), where mu_J is block J's own key maximum: all of J lies
  before the query block, so the stabiliser is causal;
- the query's own block is dyadic: pairwise inside base blocks of BASE_BLOCK positions with an
  exact row maximum over t' <= t, then level by level the right half of each aligned pair of
  groups takes the left half through the same matmul form. A row costs ~base + log2(C / base)
  elementwise terms instead of one per earlier key.
Every stabiliser depends only on positions <= t, so nothing after t enters row t, not even
through rounding, and every exponential has a non-positive argument. The stabilisers of the
matmul terms are bounds (block key max + row bias max), so a block's terms lose precision only
if w varies by more than ~80 within one row of a block (fp32 underflow). The formula as written,
for one query, is reference.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from longctx.core.dtypes import accumulation_dtype
from longctx.ops.wkv.chunk import exclusive_state_scan
from longctx.ops.wkv.reference import EMPTY, WkvState, merge_states

# Block sizes of the blocked engine (speed only; any sizes give the same results): outer blocks
# see earlier blocks through one matmul each, and inside a block a dyadic split down to
# pairwise base blocks keeps the per-row work at ~base + log2(block / base) terms.
LOCAL_BLOCK = 128
FULL_BLOCK = 256
BASE_BLOCK = 8
# Elements of all intermediates of one segment of query blocks, on every device: it bounds the
# working memory of the far terms (quadratic in N for aft_full), and in host memory it keeps each
# single intermediate under glibc's 32 MiB mmap threshold, above which freed blocks are unmapped
# and faulted afresh on every call.
SEGMENT_WORKSPACE_ELEMENTS = 1 << 25
# Past this many segments, training recomputes each segment in backward instead of keeping its
# intermediates: memory stays O(N D) plus one segment, at ~1.5x the time.
CHECKPOINT_AFTER = 4

# bias(rows [nq, R], cols [nq, K]) -> [1 or H, nq, R, K]: learned w[t, t'] at sequence indices
# (the mixer binds the absolute position of index 0; indices past the end must be tolerated).
BiasFn = Callable[[Tensor, Tensor], Tensor]


def _block_summaries(kb: Tensor, vb: Tensor) -> tuple[Tensor, Tensor, WkvState]:
    """e^{K - mu}, e^{K - mu} V per key block and each block's (sum, sum, mu) state,
    mu = block max."""
    with torch.no_grad():
        mu = kb.amax(-2)
    ek = torch.exp(kb - mu.unsqueeze(-2))
    ekv = ek * vb
    return ek, ekv, (ekv.sum(-2), ek.sum(-2), mu)


def _masked_bias(bias: BiasFn, rows: Tensor, cols: Tensor, band: int | None, dtype) -> Tensor:
    """Bias of (query, key) pairs at sequence indices rows [nq, R] x cols [nq, K]: learned inside
    the band, 0 outside it, -inf for keys in the future or before the sequence (padding)."""
    w = bias(rows, cols.clamp(min=0)).to(dtype)
    lag = rows[:, :, None] - cols[:, None, :]
    if band is not None:
        w = w.masked_fill(lag >= band, 0.0)
    return w.masked_fill((lag < 0) | (cols[:, None, :] < 0), float("-inf"))


def aft_blocked(
    k: Tensor,
    v: Tensor,
    bias: BiasFn,
    band: int | None,
    block: int,
    prefix: WkvState,
    first: int = 0,
    base: int = BASE_BLOCK,
) -> Tensor:
    """Weighted means of v [B, H, L, Dh] for sequence indices first..L-1.

    Keys with learned bias are those with lag < `band` (None: all of them, aft_full); older keys
    have bias 0. `prefix` (a WKV state, no decay) summarises keys before index 0. `block` is the
    outer block size, `base` the size of the pairwise blocks inside it (speed only).
    """
    dtype = accumulation_dtype(v.dtype)
    with torch.autocast(k.device.type, enabled=False):
        prefix = tuple(s.to(dtype) for s in prefix)
        y = _aft_blocked(
            k.to(dtype), v.to(dtype), bias, band, block, min(base, block), prefix, first
        )
    return y.to(v.dtype)


def _aft_blocked(k, v, bias, band, c, base, prefix, first):
    b, h, length, d = k.shape
    n_blocks = -(-length // c)
    pad = n_blocks * c - length
    # Padded keys get exponent EMPTY: e^{EMPTY - max} = 0, so they add nothing anywhere.
    kb = F.pad(k, (0, 0, 0, pad), value=EMPTY).view(b, h, n_blocks, c, d)
    vb = F.pad(v, (0, 0, 0, pad)).view(b, h, n_blocks, c, d)
    ek, ekv, summaries = _block_summaries(kb, vb)
    starts = exclusive_state_scan(prefix, summaries, 0.0)  # state entering each block
    first_block = first // c
    blocks = torch.arange(first_block, n_blocks, device=k.device)
    rows = blocks[:, None] * c + torch.arange(c, device=k.device)  # [nq, c] sequence indices
    reach = n_blocks if band is None else -(-(band - 1) // c)  # earlier blocks the band reaches
    # Keys older than the band (none for aft_full): the prefix entering the first block reached.
    first_reached = (blocks - reach).clamp(min=0)
    older = tuple(s[:, :, first_reached] for s in starts)
    # Segments of query blocks bound the size of the intermediate terms. Their inputs come from
    # split, not slices: split's backward concatenates instead of zero-filling per slice.
    levels = max(1, math.ceil(math.log2(-(-c // base))))
    per_block = b * h * d * c * (3 * base + 6 * levels + 4 * reach)
    step = max(1, SEGMENT_WORKSPACE_ELEMENTS // per_block)
    split = lambda x: x.split(step, 2)  # noqa: E731
    queries = zip(split(kb[:, :, first_block:]), split(vb[:, :, first_block:]), rows.split(step))
    olders = zip(*(split(s) for s in older))
    if band is None:
        far = _all_earlier_blocks(ek, ekv, summaries[2], blocks, first_block, step)
    else:
        far = _band_windows(ek, ekv, summaries[2], reach, blocks, first_block, step)
    recompute = torch.is_grad_enabled() and len(blocks) > CHECKPOINT_AFTER * step
    run = partial(checkpoint, _segment, use_reentrant=False) if recompute else _segment
    outputs = [
        run(*query, pre, windows, bias, band, base)
        for query, pre, windows in zip(queries, olders, far)
    ]
    y = torch.cat(outputs, 2) if len(outputs) > 1 else outputs[0]
    start = first - first_block * c
    return y[:, :, start : start + length - first]


def _segment(kq, vq, rows, older, far, bias, band, base) -> Tensor:
    """Outputs [B, H, nq * c, D] of a segment of query blocks kq, vq [B, H, nq, c, D]: their own
    blocks, the prefix state `older`, and `far` earlier key blocks (None: none)."""
    state = _within_blocks(kq, vq, rows, bias, band, base)
    state = merge_states(state, tuple(x.unsqueeze(-2) for x in older), 0.0)
    if far is not None:
        *blocks, key_blocks, taken = far
        if taken is not None:  # aft_full: gather here, so a checkpointed segment keeps no copy
            blocks = [x[:, :, taken] for x in blocks]
        state = merge_states(state, _far_term(*blocks, key_blocks, bias, band, rows), 0.0)
    return (state[0] / state[1]).flatten(2, 3)


def _band_windows(ek, ekv, mu, reach, blocks, first_block, step):
    """Per segment of `step` query blocks (`blocks`, from block `first_block` on): (e^{K-mu},
    e^{K-mu} V, mu) of each query block's `reach` earlier blocks as [B, H, nq, reach, ...], their
    indices [nq, reach] (negative: padding), None."""
    if not reach:
        yield from (None for _ in range(0, len(blocks), step))
        return
    pieces = []
    for x, fill in ((ek, 0.0), (ekv, 0.0), (mu, EMPTY)):
        x = F.pad(
            x, (0, 0) * (x.dim() - 3) + (reach, 0), value=fill
        )  # key block J at index J + reach
        pieces.append(
            x[:, :, first_block:].split(step, 2)
        )  # piece i: key blocks from first + i step - reach
    for i, lo in enumerate(range(0, len(blocks), step)):
        seg = blocks[lo : lo + step]
        need = len(seg) + reach - 1  # blocks I - reach .. I - 1 of the segment's query blocks I
        windows = []
        for parts in pieces:
            span, have = [], 0
            for part in parts[i:]:
                span.append(part)
                have += part.shape[2]
                if have >= need:
                    break
            run = torch.cat(span, 2) if len(span) > 1 else span[0]
            windows.append(run[:, :, :need].unfold(2, reach, 1).movedim(-1, 3))
        yield *windows, seg[:, None] - reach + torch.arange(reach, device=seg.device), None


def _all_earlier_blocks(ek, ekv, mu, blocks, first_block, step):
    """aft_full, per segment of `step` query blocks (`blocks`, from block `first_block` on): every
    block before the segment's last one, as (sources, key block indices [nq, reach] (negative:
    padding), clamped gather indices). Sizes come from Python integers, never from the index
    tensors, so no step waits for the device."""
    for lo in range(0, len(blocks), step):
        seg = blocks[lo : lo + step]
        reach = first_block + lo + len(seg) - 1  # the segment's last block
        if not reach:
            yield None
            continue
        key_blocks = seg[:, None] - reach + torch.arange(reach, device=seg.device)
        taken = key_blocks.clamp(min=0)
        yield ek, ekv, mu, key_blocks, taken


def _far_term(ek_w, ekv_w, mu_w, key_blocks, bias, band, rows) -> WkvState:
    """(num, den, max) of query blocks (rows [nq, c]) over their earlier key blocks `key_blocks`
    [nq, r] (negative: padding), given those blocks' e^{K - mu} [B, H, nq, r, c, D] and mu."""
    c = rows.shape[1]
    cols = (key_blocks[..., None] * c + torch.arange(c, device=rows.device)).flatten(1)
    w = _masked_bias(bias, rows, cols, band, ek_w.dtype).unflatten(-1, key_blocks.shape[-1:] + (c,))
    with torch.no_grad():
        beta = w.amax(-1).clamp(min=EMPTY)  # [Hb, nq, c, r]; all -inf for padding blocks
    weights = torch.exp(w - beta[..., None]).transpose(2, 3)  # [Hb, nq, r, c, c]
    exponent = mu_w.unsqueeze(-2) + beta.transpose(2, 3)[..., None]  # [B, H, nq, r, c, D]
    with torch.no_grad():
        top = exponent.amax(3)
    scale = torch.exp(exponent - top.unsqueeze(3))
    return (scale * (weights @ ekv_w)).sum(3), (scale * (weights @ ek_w)).sum(3), top


def _within_blocks(k, v, rows, bias, band, base) -> WkvState:
    """(num, den, max) of every row t of every block over the keys t' <= t of its own block.

    Dyadic: pairwise inside base blocks of `base` positions; then, level by level, the right half
    of each aligned pair of groups (2^l base blocks each) takes the left half through a matmul
    stabilised by the left half's key maximum (all of it lies before every right-half row). So
    each row costs `base` pairwise terms plus one rescale per level, not one per earlier key.
    """
    b, h, nq, c, d = k.shape
    n_base = -(-c // base)
    n_base = 1 << math.ceil(math.log2(n_base))  # a power of two: every level pairs up evenly
    pad = n_base * base - c
    if pad:
        k = F.pad(k, (0, 0, 0, pad), value=EMPTY)
        v = F.pad(v, (0, 0, 0, pad))
        rows = torch.cat((rows, rows[:, -1:] + 1 + torch.arange(pad, device=rows.device)), 1)
    kb, vb = k.view(b, h, nq, n_base, base, d), v.view(b, h, nq, n_base, base, d)
    own_rows = rows.view(nq * n_base, base)
    own = _masked_bias(bias, own_rows, own_rows, band, k.dtype).unflatten(1, (nq, n_base))
    logits = kb.unsqueeze(-3) + own[..., None]  # [B, H, nq, n_base, t, t', D]
    with torch.no_grad():
        top = logits.amax(-2)
    near = torch.exp(logits - top.unsqueeze(-2))
    state = ((near * vb.unsqueeze(-3)).sum(-2), near.sum(-2), top)  # [B, H, nq, n_base, base, D]
    group = 1
    while group < n_base:
        pairs, width = n_base // (2 * group), group * base

        def halves(x, pairs=pairs, width=width):  # (left, right) groups
            return x.reshape(b, h, nq, pairs, 2, width, d)

        left_k, left_v = halves(kb)[:, :, :, :, 0], halves(vb)[:, :, :, :, 0]
        with torch.no_grad():
            mu = left_k.amax(-2)
        ek = torch.exp(left_k - mu.unsqueeze(-2))
        pair_rows = rows.view(nq * pairs, 2, width)
        w = _masked_bias(bias, pair_rows[:, 1], pair_rows[:, 0], band, k.dtype)
        w = w.unflatten(1, (nq, pairs))  # [Hb, nq, pairs, right row, left col]
        with torch.no_grad():
            beta = w.amax(-1)
        weights = torch.exp(w - beta[..., None])
        term = (weights @ (ek * left_v), weights @ ek, mu.unsqueeze(-2) + beta[..., None])
        split = [halves(s) for s in state]
        right = merge_states(tuple(s[:, :, :, :, 1] for s in split), term, 0.0)
        state = tuple(
            torch.stack((s[:, :, :, :, 0], r), 4).view(b, h, nq, n_base, base, d)
            for s, r in zip(split, right)
        )
        group *= 2
    return tuple(s.reshape(b, h, nq, n_base * base, d)[:, :, :, :c] for s in state)


def blocked_flops(seq_len: int, block: int, band: int | None, channels: int) -> float:
    """Forward FLOPs of `aft_blocked` over a whole sequence (all channels)."""
    n_blocks = -(-seq_len // block)
    base = min(BASE_BLOCK, block)
    levels = max(1, math.ceil(math.log2(-(-block // base))))
    pairs = n_blocks * (n_blocks - 1) / 2 if band is None else n_blocks * -(-(band - 1) // block)
    # Own block: pairwise terms (add, exp, multiply, two sums) inside base blocks, the dyadic
    # levels' matmuls (numerator and denominator, ~2 c^2 in all) and ~10 operations per level
    # and position to rescale and merge. Each earlier block: two c x c x D matmuls and a rescale.
    own = 5 * block * base + 2 * block * block + 10 * block * (levels + 1)
    far = 4 * block * block + 6 * block
    return float(channels * (n_blocks * own + pairs * far))
