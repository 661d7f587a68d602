"""The training engine of `moba`:
softmax attention over each query's own block and its selected blocks.

Apart from the sparse patterns' engine (longctx/ops/sparse/engine.py) because each query here
reads its own data-dependent blocks, so work is grouped by (query, selected block) pair; the
patterns' keys are fixed by position and shared by a whole tile of queries.

Query t (absolute position q_start + t, in block c) attends with ONE softmax to the keys j <= t of
block c and to every key of the blocks listed in `selected[..., t, :]` (earlier, complete blocks).
The two parts are computed separately, each with its log-sum-exp, and merged exactly:

- own block: a block-diagonal causal attention, one batched call over all blocks;
- selected blocks: every (query, selected block) pair is one row. Rows are sorted by group (head,
  key block), so a group shares one [block_size, Dh] key/value block, and each group is padded to
  whole tiles of `tile` rows. Groups with the same number of tiles form one batched call
  [groups, 1, rows, Dh] against their key blocks [groups, 1, block_size, Dh]. Cost grows with
  pairs x block_size, never with N^2, whatever the selection (random queries select different
  blocks in every row, so the union of a query block's selections would be dense).

The pairs are processed in waves of whole heads (about WAVE_PAIRS pairs each), so the per-pair
buffers are O(N * top_k * Dh) for at most one head at a time, small enough for the allocator to
reuse (fresh multi-100 MB buffers cost page faults on every call on CPU).

Backward is FlashAttention's: nothing of size [rows, block_size] is kept; each part recomputes its
scores against the MERGED log-sum-exp and output, which gives the exact gradient of the single
softmax over the union of keys. The selection itself is an index: no gradient flows through it.

Kernels: on CPU the fused flash-attention kernel behind `F.scaled_dot_product_attention`, called
through its aten op because the public API does not return the log-sum-exp the merge needs; on
other devices a plain matmul/softmax form (tested on CPU against the same reference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

# Rows per tile: the padding unit of a group. Larger tiles make fewer calls and give the backward
# rows long enough for the kernel's row split; smaller ones pad less.
TILE_ROWS = 256
# Rows per batched call: bounds the gathered copies (and the score matrix of the matmul form).
MAX_ROWS_PER_CALL = 32768
# (query, selected block) pairs per wave of heads.
WAVE_PAIRS = 1 << 16


class FlashCPU:
    """The fused CPU flash-attention kernel (fp64, fp32 and bf16; bf16 accumulates in fp32)."""

    name = "flash_cpu"

    @staticmethod
    def backward_heads(n_groups: int, tiles: int) -> int:
        """Its backward runs one thread per (batch, head): a call with few groups is split into
        equal runs of tiles (as heads sharing the group's keys), as few and as long as keep every
        thread evenly busy. Long runs are cheaper per pair: the kernel's per-call and per-row
        setup is spread over more pairs."""
        threads = torch.get_num_threads()
        for heads in range(1, tiles + 1):
            units = n_groups * heads
            if tiles % heads == 0 and units >= 2 * threads and units % threads == 0:
                return heads
        return tiles

    @staticmethod
    def attend(q, k, v, bias, causal, scale):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=bias, scale=scale
        )

    @staticmethod
    def attend_backward(do, q, k, v, o, lse, bias, causal, scale):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k, v, o, lse, 0.0, causal, attn_mask=bias, scale=scale
        )


class Matmul:
    """Plain matmul / softmax with scores in at least fp32 (any device)."""

    name = "matmul"

    @staticmethod
    def backward_heads(n_groups: int, tiles: int) -> int:
        return 1

    @staticmethod
    def _scores(q, k, bias, causal, scale):
        s = (
            torch.matmul(q, k.transpose(-1, -2)).to(torch.promote_types(q.dtype, torch.float32))
            * scale
        )
        if bias is not None:
            s = s + bias
        if causal:
            n = s.shape[-1]
            s = s.masked_fill(
                torch.ones(n, n, dtype=torch.bool, device=s.device).triu(1), float("-inf")
            )
        return s

    @classmethod
    def attend(cls, q, k, v, bias, causal, scale):
        s = cls._scores(q, k, bias, causal, scale)
        lse = torch.logsumexp(s, dim=-1)
        o = torch.matmul(torch.exp(s - lse[..., None]).to(v.dtype), v)
        return o, lse

    @classmethod
    def attend_backward(cls, do, q, k, v, o, lse, bias, causal, scale):
        p = torch.exp(cls._scores(q, k, bias, causal, scale) - lse[..., None])
        acc = p.dtype
        do_acc = do.to(acc)
        dv = torch.matmul(p.transpose(-1, -2), do_acc)
        dp = torch.matmul(do_acc, v.to(acc).transpose(-1, -2))
        ds = p * (dp - (do_acc * o.to(acc)).sum(-1, keepdim=True)) * scale
        dq = torch.matmul(ds, k.to(acc))
        dk = torch.matmul(ds.transpose(-1, -2), q.to(acc))
        return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype)


KERNELS = {kernel.name: kernel for kernel in (FlashCPU, Matmul)}


def default_kernel(device: torch.device) -> str:
    return FlashCPU.name if device.type == "cpu" else Matmul.name


@dataclass
class _Call:
    """One batched call over consecutive groups of a wave that all have `rows` rows."""

    first_row: int
    groups: Tensor  # global group ids: g * n_key_blocks + key block, g = batch * heads + head
    rows: int

    @property
    def row_slice(self) -> slice:
        return slice(self.first_row, self.first_row + len(self.groups) * self.rows)


class PairLayout:
    """Where the (query, selected block) pairs of heads g0..g1-1 sit in the rows of their calls.

    `selected` [g1 - g0, n, K] holds key-block indices (-1 = empty slot). Pairs are sorted by group
    (head, key block), then by query; each group is padded to whole tiles; groups with equal tile
    counts sit next to each other, so each call is one [groups, 1, rows, D] batch.
    """

    def __init__(self, selected: Tensor, g0: int, n_key_blocks: int, tile: int, max_rows: int):
        heads, n, slots = selected.shape
        device = selected.device
        n_groups = heads * n_key_blocks
        valid = selected >= 0
        group_of_pair = torch.arange(heads, device=device)[:, None, None] * n_key_blocks + selected
        group_of_pair = torch.where(valid, group_of_pair, n_groups).reshape(
            -1
        )  # empty slots sort last
        # Stable: a group's pairs stay in query order.
        pair_order = torch.argsort(group_of_pair, stable=True)[: int(valid.sum())]
        sorted_groups = group_of_pair[pair_order]
        counts = torch.bincount(sorted_groups, minlength=n_groups)
        tiles = (counts + tile - 1) // tile
        group_order = torch.argsort(tiles, stable=True)
        group_order = group_order[tiles[group_order] > 0]
        rows_of_group = tiles[group_order] * tile
        first_row = torch.zeros(n_groups, dtype=torch.long, device=device)
        first_row[group_order] = torch.cumsum(rows_of_group, 0) - rows_of_group
        first_pair = torch.cumsum(counts, 0) - counts
        rank = torch.arange(len(pair_order), device=device) - first_pair[sorted_groups]
        row_of_sorted_pair = first_row[sorted_groups] + rank

        self.n_rows = int(rows_of_group.sum())
        self.tile = tile
        # Padding rows read query 0 of the wave; nothing reads their output, and the backward
        # gives them lse = +inf (zero probability) so they add nothing to any gradient.
        self.query_of_row = torch.full((self.n_rows,), g0 * n, dtype=torch.long, device=device)
        self.query_of_row[row_of_sorted_pair] = g0 * n + pair_order // slots
        self.is_padding = torch.ones(self.n_rows, dtype=torch.bool, device=device)
        self.is_padding[row_of_sorted_pair] = False
        # row_of_slot[s, query]: the row of the query's s-th selected block; empty slots read the
        # extra row n_rows (output 0, lse -inf).
        row_of_pair = torch.full((heads * n * slots,), self.n_rows, dtype=torch.long, device=device)
        row_of_pair[pair_order] = row_of_sorted_pair
        self.row_of_slot = row_of_pair.view(heads * n, slots).t().contiguous()
        self.calls: list[_Call] = []
        global_groups = group_order + g0 * n_key_blocks
        tiles_in_order = tiles[group_order].tolist()
        start, row = 0, 0
        while start < len(tiles_in_order):
            count = tiles_in_order[start]
            end = start
            while end < len(tiles_in_order) and tiles_in_order[end] == count:
                end += 1
            per_call = max(1, max_rows // (count * tile))
            for first in range(start, end, per_call):
                last = min(end, first + per_call)
                self.calls.append(_Call(row, global_groups[first:last], count * tile))
                row += (last - first) * count * tile
            start = end


class _Geometry:
    """Shapes, positions and ALiBi biases shared by forward and backward."""

    def __init__(self, q: Tensor, n_keys: int, slots: int, block_size: int, q_start: int, slopes):
        self.batch, self.heads, self.n, self.dim = q.shape
        self.groups = self.batch * self.heads
        self.block_size = block_size
        self.q_start = q_start
        self.n_keys = n_keys
        self.n_key_blocks = -(-n_keys // block_size)
        self.first_own_block = q_start // block_size
        self.n_own_blocks = self.n_key_blocks - self.first_own_block
        self.query_pad = self.n_own_blocks * block_size - self.n
        self.slots = slots
        self.scale = 1.0 / math.sqrt(self.dim)
        # ALiBi biases in at least fp32 (the kernels accept an fp32 bias with bf16 inputs).
        self.slopes = (
            None if slopes is None else slopes.to(torch.promote_types(q.dtype, torch.float32))
        )
        heads_per_wave = max(1, WAVE_PAIRS // max(1, self.n * slots))
        self.waves = [
            (g0, min(self.groups, g0 + heads_per_wave))
            for g0 in range(0, self.groups, heads_per_wave)
        ]

    def key_blocks(self, x: Tensor) -> Tensor:
        """[B, H, Nk, D] -> contiguous [G, n_key_blocks, b, D]
        (zero padded; no copy if already so)."""
        pad = self.n_key_blocks * self.block_size - self.n_keys
        x = F.pad(x, (0, 0, 0, pad)) if pad else x
        return x.reshape(self.groups, self.n_key_blocks, self.block_size, self.dim).contiguous()

    # The own-block call batches [G * n_own_blocks, 1, b, D]: one sequence per block, a single
    # head. The CPU kernel writes its gradients in [batch, length, heads, D] order, which only
    # with one head is our contiguous per-query layout (with the blocks as heads, each of dq, dk
    # and dv needed a transposing copy, a pass over every gradient).
    def query_blocks(self, x: Tensor, value: float = 0.0) -> Tensor:
        """Per query [G * n(, D)] -> [G * n_own_blocks, 1, b(, D)], padded with `value`."""
        x = x.view(self.groups, self.n, *x.shape[1:])
        if self.query_pad:
            x = F.pad(
                x, (0, 0, 0, self.query_pad) if x.dim() == 3 else (0, self.query_pad), value=value
            )
        return x.reshape(self.groups * self.n_own_blocks, 1, self.block_size, *x.shape[2:])

    def own_key_blocks(self, blocks: Tensor) -> Tensor:
        """[G, n_key_blocks, b, D] -> the query blocks' own [G * n_own_blocks, 1, b, D]."""
        return blocks[:, self.first_own_block :].reshape(
            self.groups * self.n_own_blocks, 1, self.block_size, self.dim
        )

    def per_query(self, x: Tensor) -> Tensor:
        """[G * n_own_blocks, 1, b(, D)] -> [G * n(, D)]: drops the query padding."""
        x = x.reshape(self.groups, self.n_own_blocks * self.block_size, *x.shape[3:])[:, : self.n]
        return x.reshape(self.groups * self.n, *x.shape[2:])

    def own_bias(self) -> Tensor | None:
        """ALiBi inside a block, [G * n_own_blocks, 1, b, b]:
        -slope * (i - j), alike in every block."""
        if self.slopes is None:
            return None
        local = torch.arange(self.block_size, device=self.slopes.device)
        distance = (local[:, None] - local[None, :]).to(self.slopes.dtype)
        per_group = (-self.slopes[:, None, None] * distance).repeat(self.batch, 1, 1)
        blocks = per_group[:, None].expand(
            self.groups, self.n_own_blocks, self.block_size, self.block_size
        )
        return blocks.reshape(self.groups * self.n_own_blocks, 1, self.block_size, self.block_size)

    def pair_bias(self, query_index: Tensor, call: _Call) -> Tensor | None:
        """ALiBi of one call's rows against their groups' key blocks, [groups, 1, rows, b]."""
        if self.slopes is None:
            return None
        q_pos = (self.q_start + query_index % self.n).view(len(call.groups), 1, call.rows, 1)
        key_block = call.groups % self.n_key_blocks
        head = call.groups // self.n_key_blocks % self.heads
        k_pos = key_block[:, None] * self.block_size + torch.arange(
            self.block_size, device=q_pos.device
        )
        distance = (q_pos - k_pos[:, None, None, :]).to(self.slopes.dtype)
        return -self.slopes[head][:, None, None, None] * distance


class _CallOperands:
    """One call's gathered query rows and key/value blocks: [groups, heads, rows / heads | b, D].

    heads = 1 folds each group's rows into one sequence; heads = its tile count splits them into
    tiles sharing the group's key block (expanded, no copy) to give the kernel more parallel units.
    """

    def __init__(
        self,
        geo: _Geometry,
        call: _Call,
        layout: PairLayout,
        kb: Tensor,
        vb: Tensor,
        heads: int = 1,
    ):
        n_groups = len(call.groups)
        self.shape = (n_groups, heads, call.rows // heads)
        self.query_index = layout.query_of_row[call.row_slice]
        blocks = (n_groups, heads, geo.block_size, geo.dim)
        self.k = kb.index_select(0, call.groups)[:, None].expand(blocks)
        self.v = vb.index_select(0, call.groups)[:, None].expand(blocks)
        bias = geo.pair_bias(self.query_index, call)
        self.bias = None if bias is None else bias.view(*self.shape, geo.block_size)

    def gather(self, per_query: Tensor) -> Tensor:
        """Per-query rows [G * n(, D)] -> this call's rows [groups, heads, rows / heads(, D)]."""
        picked = per_query.index_select(0, self.query_index)
        return picked.view(*self.shape, *picked.shape[1:])


def _wave_forward(geo, layout, kernel, q_flat, kb_flat, vb_flat, row_out, row_lse):
    """(out, lse) of every pair row of one wave into the shared row buffers, plus the extra row
    n_rows = (0, -inf) that empty slots read."""
    row_out[layout.n_rows], row_lse[layout.n_rows] = 0.0, float("-inf")
    for call in layout.calls:
        ops = _CallOperands(geo, call, layout, kb_flat, vb_flat)
        out, lse = kernel.attend(ops.gather(q_flat), ops.k, ops.v, ops.bias, False, geo.scale)
        row_out[call.row_slice].view_as(out).copy_(out)
        row_lse[call.row_slice].view_as(lse).copy_(lse)


def _row_buffer(layouts: list[PairLayout], like: Tensor, *shape: int, dtype: torch.dtype) -> Tensor:
    """One buffer for the pair rows of every wave (the widest wave plus the empty-slot row): a
    fresh buffer per wave costs its page faults again each time, about as much as its copies."""
    return like.new_empty(
        max((layout.n_rows for layout in layouts), default=0) + 1, *shape, dtype=dtype
    )


class _SelectedBlockAttention(torch.autograd.Function):
    """moba's attention over own and selected blocks (the module docstring); backward recomputes
    each part against the merged log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, selected, block_size, slopes, q_start, kernel_name, tile, max_rows):
        kernel = KERNELS[kernel_name]
        geo = _Geometry(q, k.shape[2], selected.shape[-1], block_size, q_start, slopes)
        selected = selected.reshape(geo.groups, geo.n, geo.slots)
        kb, vb = geo.key_blocks(k), geo.key_blocks(v)
        kb_flat, vb_flat = kb.view(-1, block_size, geo.dim), vb.view(-1, block_size, geo.dim)
        q_flat = q.reshape(geo.groups * geo.n, geo.dim).contiguous()

        own_out, own_lse = kernel.attend(
            geo.query_blocks(q_flat),
            geo.own_key_blocks(kb),
            geo.own_key_blocks(vb),
            geo.own_bias(),
            True,
            geo.scale,
        )
        # The merged result overwrites the own-block part wave by wave (each wave reads only its
        # own queries before writing them).
        out, lse = geo.per_query(own_out), geo.per_query(own_lse)

        layouts = [
            PairLayout(selected[g0:g1], g0, geo.n_key_blocks, tile, max_rows)
            for g0, g1 in geo.waves
        ]
        row_out = _row_buffer(layouts, q_flat, geo.dim, dtype=q_flat.dtype)
        row_lse = _row_buffer(layouts, q_flat, dtype=lse.dtype)
        # One slot's rows of a wave, gathered into the same buffer each time (fresh multi-MB
        # gathers and products would be page-faulted again on every call: see
        # longctx/bench/allocator.py).
        slot_rows = q_flat.new_empty(max(g1 - g0 for g0, g1 in geo.waves) * geo.n, geo.dim)
        for (g0, g1), layout in zip(geo.waves, layouts):
            _wave_forward(geo, layout, kernel, q_flat, kb_flat, vb_flat, row_out, row_lse)
            # Merge the own block and the selected blocks into one softmax, in slot order, in
            # place (in fp32 for reduced-precision outputs, rounded once at the end).
            queries = slice(g0 * geo.n, g1 * geo.n)
            lse_parts = torch.cat((lse[None, queries], row_lse[layout.row_of_slot]))
            wave_lse = torch.logsumexp(lse_parts, dim=0)
            weights = torch.exp(lse_parts - wave_lse)[:, :, None]
            in_place = out.dtype == lse.dtype
            merged = out[queries] if in_place else out[queries].to(lse.dtype)
            merged.mul_(weights[0])
            gathered = slot_rows[: len(wave_lse)]
            for slot, rows in enumerate(layout.row_of_slot, start=1):
                merged.addcmul_(torch.index_select(row_out, 0, rows, out=gathered), weights[slot])
            if not in_place:
                out[queries] = merged
            lse[queries] = wave_lse

        ctx.save_for_backward(q_flat, kb, vb, out, lse)
        ctx.geo, ctx.layouts, ctx.kernel = geo, layouts, kernel
        return out.view(geo.batch, geo.heads, geo.n, geo.dim)

    @staticmethod
    def backward(ctx, grad_out):
        q_flat, kb, vb, out, lse = ctx.saved_tensors
        geo, layouts, kernel = ctx.geo, ctx.layouts, ctx.kernel
        acc = torch.promote_types(q_flat.dtype, torch.float32)
        do_flat = grad_out.reshape(geo.groups * geo.n, geo.dim).contiguous()
        kb_flat, vb_flat = (
            kb.view(-1, geo.block_size, geo.dim),
            vb.view(-1, geo.block_size, geo.dim),
        )

        # Each part's backward sees the MERGED output and lse: exact gradients of the one softmax.
        own = geo.first_own_block
        dq_own, dk_own, dv_own = kernel.attend_backward(
            geo.query_blocks(do_flat),
            geo.query_blocks(q_flat),
            geo.own_key_blocks(kb),
            geo.own_key_blocks(vb),
            geo.query_blocks(out),
            geo.query_blocks(lse, value=float("inf")),
            geo.own_bias(),
            True,
            geo.scale,
        )
        dq = geo.per_query(dq_own).to(acc)
        if own == 0:
            dk, dv = dk_own.to(acc).reshape(kb.shape), dv_own.to(acc).reshape(kb.shape)
        else:  # streaming: keys before the first query's block get gradients from pairs only
            dk = torch.zeros(kb.shape, dtype=acc, device=kb.device)
            dv = torch.zeros_like(dk)
            dk[:, own:], dv[:, own:] = dk_own.view_as(dk[:, own:]), dv_own.view_as(dv[:, own:])

        dk_flat, dv_flat = (
            dk.view(-1, geo.block_size, geo.dim),
            dv.view(-1, geo.block_size, geo.dim),
        )
        for layout in layouts:
            row_lse = lse.index_select(0, layout.query_of_row).masked_fill(
                layout.is_padding, float("inf")
            )
            for call in layout.calls:
                heads = kernel.backward_heads(len(call.groups), call.rows // layout.tile)
                ops = _CallOperands(geo, call, layout, kb_flat, vb_flat, heads)
                dq_call, dk_call, dv_call = kernel.attend_backward(
                    ops.gather(do_flat),
                    ops.gather(q_flat),
                    ops.k,
                    ops.v,
                    ops.gather(out),
                    row_lse[call.row_slice].view(ops.shape),
                    ops.bias,
                    False,
                    geo.scale,
                )
                # Straight into the queries' gradients: padding rows have zero probability, so
                # their (query 0) rows add exact zeros.
                dq.index_add_(0, ops.query_index, dq_call.reshape(-1, geo.dim).to(acc))
                dk_flat.index_add_(0, call.groups, dk_call.sum(1, dtype=acc))
                dv_flat.index_add_(0, call.groups, dv_call.sum(1, dtype=acc))

        def per_key(x: Tensor) -> Tensor:
            return x.view(geo.batch, geo.heads, -1, geo.dim)[:, :, : geo.n_keys].to(q_flat.dtype)

        dq = dq.view(geo.batch, geo.heads, geo.n, geo.dim).to(q_flat.dtype)
        return dq, per_key(dk), per_key(dv), None, None, None, None, None, None, None


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    selected: Tensor,
    block_size: int,
    slopes: Tensor | None = None,
    q_start: int = 0,
    kernel: str | None = None,
    tile: int = TILE_ROWS,
    max_rows: int = MAX_ROWS_PER_CALL,
) -> Tensor:
    """Attention of q [B, H, n, D] (positions q_start..) over k, v [B, H, q_start + n, D].

    Query t attends to keys j <= q_start + t of its own block and to all keys of the blocks in
    `selected` [B, H, n, K] (block indices, -1 = empty slot; each must be complete and earlier).
    `q_start` must be a multiple of `block_size`.
    ALiBi `slopes` [H] bias scores by -slope * (i - j).
    `kernel`: "flash_cpu" or "matmul" (default: flash_cpu on CPU, matmul elsewhere).
    """
    if q_start % block_size:
        raise ValueError(f"q_start={q_start} must be a multiple of block_size={block_size}")
    if k.shape[2] != q_start + q.shape[2]:
        raise ValueError(
            f"keys cover {k.shape[2]} positions, expected q_start + n = {q_start + q.shape[2]}"
        )
    kernel = kernel or default_kernel(q.device)
    return _SelectedBlockAttention.apply(
        q, k, v, selected, block_size, slopes, q_start, kernel, tile, max_rows
    )
