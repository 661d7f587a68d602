"""The block-sparse softmax engine (CPU training path, and any device when called directly).

Apart from moba's engine (longctx/ops/moba/engine.py) because here the keys a query reads are a
fixed function of positions, shared by every query of a tile, so tiles of a pattern are read
whole; moba's keys depend on each query's own gate, so that engine pairs queries with blocks.

A pattern is cut into disjoint *parts*. A `BlockLayout` part reorders the queries and keys
(identity, or regrouped by residue so that dilated/strided patterns become contiguous
windows), cuts them into blocks of `block` slots, and lists for every query block the key
blocks it reads; a precomputed mask inside the gathered tiles applies the exact predicate.
A `SelfPart` is the `j = i` key alone, for patterns whose main part may miss it. Each part
returns its output and log-sum-exp; parts are merged exactly by their log-sum-exps, so a key
must belong to exactly one part of a query (the patterns guarantee it).

Tiles are computed key-major (scores transposed, [keys, queries]): every large matmul operand
is then row-major, so BLAS reads each in its storage order instead of through a transpose.
Memory: O(N * D) per part for inputs, output and gradients, one chunk of scores at a time,
and additive masks for the partially allowed tiles only (built once per length, shared by
batch, heads, layers and equal tiles). The backward recomputes the probabilities from the saved
log-sum-exp (FlashAttention-style) instead of saving them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from longctx.core.dtypes import accumulation_dtype
from longctx.ops.softmax.merge import merge_by_lse

# Score elements of one (batch, head) slice per chunk of query blocks. On a CPU each thread runs
# the whole engine for its own heads (longctx.ops.head_parallel), so every operator of a chunk is
# one more dispatch that two threads take turns for: chunks of 4 MiB of fp32 scores per 8 heads
# ran the split engine faster than cache-sized 1 MiB ones, and a single thread slightly slower
# (docs/kernels.md, "CPU threads", links the measurements).
CHUNK_SCORES = 1 << 17

PositionPredicate = Callable[[Tensor, Tensor], Tensor]

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


@dataclass(frozen=True, eq=False)
class Chunk:
    """Query blocks first..end-1, reading `width` key blocks each.

    `masks` holds, for the key-slot ranges (lo, hi) that contain a disallowed entry, an additive
    0 / -inf tile [c, hi - lo, block]; the other tiles are fully allowed and need no mask. `span`
    is the first key block when the chunk is one query block reading consecutive key blocks:
    its keys are then a view of the key sequence (no gather, no scatter-add). `empty_rows`: some
    query slot (padding, or a query this part gives no key) has no allowed key.
    """

    first: int
    end: int
    width: int
    masks: tuple[tuple[int, int, Tensor], ...]
    span: int | None
    empty_rows: bool

    def to(self, device: torch.device) -> Chunk:
        masks = tuple((lo, hi, bias.to(device)) for lo, hi, bias in self.masks)
        return Chunk(self.first, self.end, self.width, masks, self.span, self.empty_rows)


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """One part of a pattern as gathered tiles.

    q_pos / k_pos give the original position held by each query / key slot (-1 = padding).
    `table[r]` lists the key blocks query block r reads; entries past a row's own count (a chunk
    is as wide as its widest row) repeat a real block and are fully masked.
    """

    block: int
    q_pos: Tensor
    k_pos: Tensor
    table: Tensor
    chunks: tuple[Chunk, ...]
    q_identity: bool
    k_identity: bool

    def to(self, device: torch.device) -> BlockLayout:
        if self.q_pos.device == device:
            return self
        return BlockLayout(
            self.block,
            self.q_pos.to(device),
            self.k_pos.to(device),
            self.table.to(device),
            tuple(chunk.to(device) for chunk in self.chunks),
            self.q_identity,
            self.k_identity,
        )


@dataclass(frozen=True, eq=False)
class SelfPart:
    """Query i attends to key i alone where `rows(i)` holds (no other key of this part)."""

    rows: Callable[[Tensor], Tensor]


Part = BlockLayout | SelfPart


def computed_pairs(part: Part, n: int) -> int:
    """(query, key) pairs the engine computes for one head over n positions.

    A block part counts every tile it reads, masked entries included (the wasted part of
    partially allowed tiles and the padding of a chunk to its widest row); a self part one pair
    per query.
    """
    if isinstance(part, SelfPart):
        return n
    return sum((c.end - c.first) * c.width for c in part.chunks) * part.block * part.block


def make_layout(
    q_pos: Tensor,
    k_pos: Tensor,
    first: Tensor,
    last: Tensor,
    block: int,
    allowed: PositionPredicate,
) -> BlockLayout:
    """Build a part where query block r reads key blocks first[r]..last[r]
    (none when last < first)."""
    n_kblocks = len(k_pos) // block
    counts = (last - first + 1).clamp_min(0)
    width = max(int(counts.max()), 1)
    unused = torch.arange(width) >= counts[:, None]
    table = (first[:, None] + torch.arange(width)).clamp(0, n_kblocks - 1)
    chunks, shared = [], {}
    for start, end, chunk_width in _group_rows(counts.tolist(), block):
        i = q_pos[start * block : end * block].view(end - start, 1, block)
        j = k_pos.view(-1, block)[table[start:end, :chunk_width]].view(
            end - start, chunk_width, block, 1
        )
        blocked = ~(allowed(i[:, None], j) & (j <= i[:, None]) & (j >= 0))
        blocked = (blocked | unused[start:end, :chunk_width, None, None]).view(
            end - start, -1, block
        )
        partial = blocked.view(end - start, chunk_width, -1).any(-1).any(0).tolist()
        masks = tuple(
            (lo, hi, _additive_mask(blocked[:, lo:hi], shared)) for lo, hi in _runs(partial, block)
        )
        blocks = table[start, :chunk_width]
        consecutive = end - start == 1 and bool((blocks.diff() == 1).all())
        chunks.append(
            Chunk(
                start,
                end,
                chunk_width,
                masks,
                int(blocks[0]) if consecutive else None,
                empty_rows=bool(blocked.all(1).any()),
            )
        )
    return BlockLayout(
        block,
        q_pos,
        k_pos,
        table,
        tuple(chunks),
        q_identity=_is_natural(q_pos),
        k_identity=_is_natural(k_pos),
    )


def _additive_mask(blocked: Tensor, shared: dict) -> Tensor:
    """0 / -inf tile; equal tiles (every interior block of a band) share one tensor."""
    key = (tuple(blocked.shape), blocked.numpy().tobytes())
    if key not in shared:
        shared[key] = torch.zeros(blocked.shape).masked_fill_(blocked, float("-inf"))
    return shared[key]


def _runs(flags: list[bool], block: int) -> tuple[tuple[int, int], ...]:
    """Key-slot ranges of consecutive flagged key blocks."""
    runs, start = [], None
    for index, flag in enumerate(flags + [False]):
        if flag and start is None:
            start = index
        elif not flag and start is not None:
            runs.append((start * block, index * block))
            start = None
    return tuple(runs)


def _is_natural(pos: Tensor) -> bool:
    """Slots hold positions 0..n-1 in order, then padding: gathering is a plain pad."""
    slots = torch.arange(len(pos))
    return bool(torch.equal(pos, torch.where(slots < int((pos >= 0).sum()), slots, -1)))


def _group_rows(counts: list[int], block: int) -> list[tuple[int, int, int]]:
    """Consecutive query blocks (first, end, widest) grouped while the chunk stays within budget."""
    groups, start, widest = [], 0, 0
    for row, count in enumerate(counts):
        wider = max(widest, count, 1)
        if row > start and (row + 1 - start) * wider * block * block > CHUNK_SCORES:
            groups.append((start, row, widest))
            start, wider = row, max(count, 1)
        widest = wider
    groups.append((start, len(counts), widest))
    return groups


def _gather_slots(x: Tensor, pos: Tensor, identity: bool) -> Tensor:
    """x [BH, N, ...] rearranged into slots [BH, len(pos), ...] (zeros in padding slots)."""
    n = x.shape[1]
    if identity:
        return x if len(pos) == n else F.pad(x, (0, 0) * (x.dim() - 2) + (0, len(pos) - n))
    return _select_rows(x, pos)


def _scatter_slots(x: Tensor, pos: Tensor, n: int, identity: bool) -> Tensor:
    """The inverse of _gather_slots: slots [BH, M, ...] back to positions [BH, n, ...]
    (absent = 0)."""
    if identity:  # the slots hold a prefix of the positions (all, or fewer for global keys)
        return (
            x[:, :n] if x.shape[1] >= n else F.pad(x, (0, 0) * (x.dim() - 2) + (0, n - x.shape[1]))
        )
    slot = torch.full((n,), -1, dtype=torch.long, device=pos.device)
    valid = pos >= 0
    slot[pos[valid]] = torch.arange(len(pos), device=pos.device)[valid]
    return _select_rows(x, slot)


def _select_rows(x: Tensor, index: Tensor) -> Tensor:
    """x[:, index] with zero rows where index is -1 (no padded copy of x)."""
    rows = x.index_select(1, index.clamp_min(0))
    missing = index < 0
    if missing.any():
        rows[:, missing] = 0
    return rows


def _key_blocks(x: Tensor, layout: BlockLayout) -> Tensor:
    """x [BH, N, D] as key blocks [BH, n_blocks, block, D]."""
    slots = _gather_slots(x, layout.k_pos, layout.k_identity)
    return slots.view(x.shape[0], -1, layout.block, x.shape[-1])


def _tile(blocks: Tensor, layout: BlockLayout, chunk: Chunk) -> Tensor:
    """The chunk's keys (or values) [BH, c, width*block, D] from blocks [BH, n_blocks, block, D]."""
    rows, (heads, _, block, dim) = chunk.end - chunk.first, blocks.shape
    if chunk.span is not None:
        return blocks[:, chunk.span : chunk.span + chunk.width].view(
            heads, 1, chunk.width * block, dim
        )
    index = layout.table[chunk.first : chunk.end, : chunk.width].flatten()
    return blocks.index_select(1, index).view(heads, rows, chunk.width * block, dim)


def _scaled_matmul(a: Tensor, b: Tensor, scale: float) -> Tensor:
    """scale * (a @ b) for [BH, c, m, k] @ [BH, c, k, n]. BLAS applies the scale for free: no pass
    over the product and no scaled copy of an operand (a transposed view of a longer tensor is
    read in place when c = 1)."""
    a3, b3 = a.flatten(0, 1), b.flatten(0, 1)
    ignored = a3.new_zeros(()).expand(a3.shape[0], a3.shape[1], b3.shape[2])  # beta = 0: never read
    return torch.baddbmm(ignored, a3, b3, beta=0.0, alpha=scale).view(*a.shape[:-1], b.shape[-1])


def _accumulate(
    grad: Tensor, a: Tensor, b: Tensor, layout: BlockLayout, chunk: Chunk, alpha: float = 1.0
) -> None:
    """grad [BH, n_blocks, block*D] += alpha * a @ b over the chunk's key blocks, for tiles
    a [BH, c, width*block, m] and b [BH, c, m, D]."""
    if chunk.span is not None and a.dtype == grad.dtype:
        # Consecutive key blocks of one query block: the product accumulates in place (one pass
        # over the gradient instead of a product tile plus an add, and no tile is allocated).
        keys = grad[:, chunk.span : chunk.span + chunk.width].view(grad.shape[0], -1, b.shape[-1])
        keys.baddbmm_(a.flatten(0, 1), b.flatten(0, 1), alpha=alpha)
        return
    tile = torch.matmul(a, b).reshape(grad.shape[0], -1, grad.shape[-1]).to(grad.dtype)
    if chunk.span is not None:
        grad[:, chunk.span : chunk.span + chunk.width].add_(tile, alpha=alpha)
    else:
        grad.index_add_(
            1, layout.table[chunk.first : chunk.end, : chunk.width].flatten(), tile, alpha=alpha
        )


def _tile_scores(
    q: Tensor, ks: Tensor, q_scale: float, slopes2: Tensor | None, layout: BlockLayout, chunk: Chunk
):
    """Key-major masked scores in log2 units [BH, c, width*block, block] (accumulation dtype),
    and the keys.

    `q_scale` is 1/sqrt(D), times log2(e) for fp32/fp64 (base-2 exponentials are about 3x
    cheaper than exp here); for bf16/fp16 the log2(e) factor is applied to the fp32 scores.
    """
    block, rows = layout.block, chunk.end - chunk.first
    kb = _tile(ks, layout, chunk)
    acc = accumulation_dtype(q.dtype)
    scores = _scaled_matmul(kb, _rows(q, block, chunk).transpose(-1, -2), q_scale).to(acc)
    if q.dtype != acc:
        scores.mul_(LOG2E)
    if slopes2 is not None:  # ALiBi: -slope_h * (i - j) on original positions
        i = layout.q_pos[chunk.first * block : chunk.end * block].view(rows, 1, block)
        table = layout.table[chunk.first : chunk.end, : chunk.width]
        j = layout.k_pos.view(-1, block)[table].view(rows, chunk.width * block, 1)
        scores.addcmul_(slopes2, (i - j).to(acc), value=-1.0)
    for lo, hi, bias in chunk.masks:  # fully allowed tiles need no mask
        scores[:, :, lo:hi] += bias
    return scores, kb


def _rows(x: Tensor, block: int, chunk: Chunk) -> Tensor:
    """The chunk's query rows of x [BH, M, ...] as [BH, c, block, ...]."""
    return x[:, chunk.first * block : chunk.end * block].unflatten(
        1, (chunk.end - chunk.first, block)
    )


class _BlockSparseAttention(torch.autograd.Function):
    """(output, lse) of one BlockLayout part; backward recomputes probabilities chunk by chunk.

    Big temporaries are avoided on purpose (host memory above malloc's mmap threshold is
    page-faulted afresh on every call: longctx/bench/allocator.py states what that costs):
    the 1/sqrt(D) scales ride on the tile products (BLAS alpha), and keys/values are views of
    the inputs when the part keeps natural order.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, slopes: Tensor | None, layout: BlockLayout):
        batch, heads, n, dim = q.shape
        acc, block = accumulation_dtype(q.dtype), layout.block
        q_scale = dim**-0.5 * (LOG2E if q.dtype == acc else 1.0)
        # Contiguous copies when needed: q, k, v usually arrive as strided views of a fused
        # projection, and tiles cut from those would make BLAS walk strided rows in every product
        # (docs/results/bench_cpu/sparse_contiguous: the engine with these copies).
        qs = _gather_slots(
            q.reshape(batch * heads, n, dim).contiguous(), layout.q_pos, layout.q_identity
        )
        ks, vs = (
            _key_blocks(t.reshape(batch * heads, n, dim).contiguous(), layout) for t in (k, v)
        )
        slopes2 = (
            None if slopes is None else (slopes.to(acc) * LOG2E).repeat(batch).view(-1, 1, 1, 1)
        )
        # Natural order writes straight into the returned tensor (which must not be a view of a
        # tensor saved for backward); other orders go through slots and are scattered back once.
        output = qs.new_empty(batch * heads, n, dim)
        out = output if layout.q_identity else torch.empty_like(qs)
        lse2 = qs.new_empty(qs.shape[:2], dtype=acc)  # log2-sum-exp2 of the log2-unit scores
        for chunk in layout.chunks:
            scores, _ = _tile_scores(qs, ks, q_scale, slopes2, layout, chunk)
            vb = _tile(vs, layout, chunk)
            peak = scores.amax(-2, keepdim=True)
            if chunk.empty_rows:  # a query with no allowed key: exp stays 0, its output 0, lse -inf
                peak.masked_fill_(peak == float("-inf"), 0.0)
            probs = scores.sub_(peak).exp2_()
            total = probs.sum(-2, keepdim=True)
            tile = torch.matmul(probs.transpose(-1, -2).to(vb.dtype), vb).to(acc)
            tile.div_(
                (total.masked_fill(total == 0, 1.0) if chunk.empty_rows else total).transpose(
                    -1, -2
                )
            )
            rows = slice(chunk.first * block, min(chunk.end * block, out.shape[1]))
            out[:, rows] = tile.flatten(1, 2)[:, : rows.stop - rows.start]
            _rows(lse2, block, chunk).copy_((peak + total.log2()).squeeze(-2))
        if not layout.q_identity:
            output.copy_(_scatter_slots(out, layout.q_pos, n, identity=False))
        output = output.view(batch, heads, n, dim)
        ctx.save_for_backward(qs, ks, vs, output, lse2, slopes2)
        ctx.layout, ctx.q_scale = layout, q_scale
        ctx.set_materialize_grads(False)
        return output, _scatter_slots(lse2 * LN2, layout.q_pos, n, layout.q_identity).view(
            batch, heads, n
        )

    @staticmethod
    def backward(ctx, grad_out: Tensor | None, grad_lse: Tensor | None):
        qs, ks, vs, output, lse2, slopes2 = ctx.saved_tensors
        layout, (batch, heads, n, dim) = ctx.layout, output.shape
        acc, block = lse2.dtype, layout.block
        if grad_out is None:
            grad_out = torch.zeros_like(output)
        out = _gather_slots(output.view(batch * heads, n, dim), layout.q_pos, layout.q_identity)
        gos = _gather_slots(
            grad_out.reshape(batch * heads, n, dim), layout.q_pos, layout.q_identity
        )
        dlse = (
            None
            if grad_lse is None
            else _gather_slots(grad_lse.reshape(batch * heads, n), layout.q_pos, layout.q_identity)
        )
        # Queries with no allowed key (lse = -inf): +inf makes their probabilities exactly 0.
        lse2 = lse2.masked_fill(lse2 == float("-inf"), float("inf"))
        dq = torch.empty_like(qs, dtype=acc)
        dk = torch.zeros(ks.shape[0], ks.shape[1], block * dim, dtype=acc, device=qs.device)
        dv = torch.zeros_like(dk)
        for chunk in layout.chunks:
            scores, kb = _tile_scores(qs, ks, ctx.q_scale, slopes2, layout, chunk)
            vb = _tile(vs, layout, chunk)
            probs = scores.sub_(_rows(lse2, block, chunk).unsqueeze(-2)).exp2_()
            go = _rows(gos, block, chunk)
            # dS = P * (dP - delta), delta = rowsum(dO * O) - dLSE (the lse output's own gradient).
            delta = (go.to(acc) * _rows(out, block, chunk).to(acc)).sum(-1)
            if dlse is not None:
                delta -= _rows(dlse, block, chunk)
            # A contiguous transposed copy of the small dO tile: the bmm is slow on a transposed
            # view, and dO itself may be an expanded tensor (loss = out.sum()).
            dscores = torch.matmul(vb, go.transpose(-1, -2).contiguous()).to(acc)
            _accumulate(dv, probs.to(go.dtype), go, layout, chunk)
            # dscores is the gradient of the natural-unit scores q.k / sqrt(D): dq and dk take
            # the 1/sqrt(D) as the products' scale.
            dscores = dscores.sub_(delta.unsqueeze(-2)).mul_(probs).to(qs.dtype)
            _rows(dq, block, chunk).copy_(_scaled_matmul(dscores.transpose(-1, -2), kb, dim**-0.5))
            _accumulate(dk, dscores, _rows(qs, block, chunk), layout, chunk, alpha=dim**-0.5)
        dq = _scatter_slots(dq, layout.q_pos, n, layout.q_identity)
        dk, dv = (
            _scatter_slots(t.view(t.shape[0], -1, dim), layout.k_pos, n, layout.k_identity)
            for t in (dk, dv)
        )
        shape = (batch, heads, n, dim)
        return (
            dq.to(qs.dtype).view(shape),
            dk.to(qs.dtype).view(shape),
            dv.to(qs.dtype).view(shape),
            None,
            None,
        )


def _self_attention(q: Tensor, k: Tensor, v: Tensor, part: SelfPart) -> tuple[Tensor, Tensor]:
    """The single key j = i: output v_i,
    log-sum-exp q_i.k_i / sqrt(D) (ALiBi adds 0 at distance 0)."""
    n, acc = q.shape[-2], accumulation_dtype(q.dtype)
    rows = part.rows(torch.arange(n, device=q.device))
    logits = (q.to(acc) * k.to(acc)).sum(-1) * q.shape[-1] ** -0.5
    return v, logits.masked_fill(~rows, float("-inf"))


def attend_parts(
    q: Tensor, k: Tensor, v: Tensor, parts: tuple[Part, ...], slopes: Tensor | None
) -> Tensor:
    """Softmax attention of q, k, v [B, H, N, D] over the union of disjoint parts."""
    results = []
    for part in parts:
        if isinstance(part, SelfPart):
            results.append(_self_attention(q, k, v, part))
        else:
            results.append(_BlockSparseAttention.apply(q, k, v, slopes, part.to(q.device)))
    return merge_by_lse(results, q.dtype)
