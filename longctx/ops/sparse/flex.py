"""FlexAttention for the sparse patterns: queries and keys regrouped into slots so that every
query reads a few contiguous runs of key slots, and BlockMasks with full tiles built from them.

A pattern component describes itself as `SlotPlan`s (patterns.py). A plan puts the queries in
one order (natural, or grouped by residue mod a stride) and the keys in one or more regions laid
end to end (natural order, by residue, the summary columns, the global prefix). Each query slot
then reads at most INTERVALS intervals [lo, hi] of key slots, every key inside them allowed, and
the intervals are exactly the pattern. Three things follow:
- mask_mod is "lo[t, q] <= kv <= hi[t, q] for some t": tables and no pattern logic, so every
  pattern of the same shapes runs the same compiled kernel;
- the tile grids come from the tables' per-tile extremes, O(N + (N/128)^2) work and never an
  N x N mask: query tile R reads key tile C when C meets [min lo, max hi] over R's rows, and
  C is full when it lies inside [max lo, min hi] of one interval;
- regrouping by residue turns dilated windows and strided columns into contiguous runs, so a
  head of sparse_strided's A2 reads a handful of tiles per query tile instead of all of them.
Plans of one component whose query orders differ (sparse_strided's union layout) are separate
Flex calls merged by their log-sum-exps; all other components are one call per head group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from longctx.ops.softmax.flex import (
    TILE,
    alibi_score_mod,
    block_mask_from_tiles,
    bucket,
    flex,
    tiles,
)
from longctx.ops.softmax.merge import merge_by_lse

# Intervals per query slot in every plan (unused ones are empty): one shape for all mask_mods.
INTERVALS = 2
Interval = tuple[Tensor, Tensor]  # (lo, hi) per query slot; lo > hi: empty


@dataclass(frozen=True, eq=False)
class SlotPlan:
    """One Flex call: query slots, key slots (regions end to end) and the intervals they read.

    q_pos / k_pos: the position each slot holds; lo / hi [INTERVALS, Mq]: the key slots read.
    natural_queries / natural_keys: the slots are positions 0..n-1 in order (no gather needed).
    """

    q_pos: Tensor
    k_pos: Tensor
    lo: Tensor
    hi: Tensor
    natural_queries: bool
    natural_keys: bool


def residue_slots(n: int, stride: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Positions grouped by residue mod `stride` (classes in order, each in position order),
    with no padding between classes: (position of each slot, first slot of its class)."""
    size, rest = divmod(n, stride)  # classes r < rest hold size + 1 positions, the others size
    slot = torch.arange(n, device=device)
    big = rest * (size + 1)
    in_big = slot < big
    residue = torch.where(in_big, slot // (size + 1), rest + (slot - big) // max(size, 1))
    start = torch.where(in_big, residue * (size + 1), big + (residue - rest) * size)
    return residue + (slot - start) * stride, start


def summary_positions(n: int, stride: int, summary: int, device: torch.device) -> Tensor:
    """The positions j < n with j mod stride >= stride - summary, in order."""
    count = (n // stride) * summary + max(0, n % stride - (stride - summary))
    slot = torch.arange(count, device=device)
    return slot // summary * stride + (stride - summary) + slot % summary


def summaries_through(i: Tensor, stride: int, summary: int) -> Tensor:
    """How many summary positions lie in 0..i."""
    return (i + 1) // stride * summary + ((i + 1) % stride - (stride - summary)).clamp_min(0)


def make_plan(
    n: int,
    q_pos: Tensor | None,
    regions: list[Tensor | None],
    intervals: list[Interval],
    device: torch.device,
) -> SlotPlan:
    """A plan over the query slots q_pos (None: natural order) and the key regions laid end to
    end (None: all positions in natural order); intervals index the concatenated key slots."""
    positions = torch.arange(n, device=device)
    keys = [positions if region is None else region for region in regions]
    queries = positions if q_pos is None else q_pos
    empty = (torch.ones_like(queries), torch.zeros_like(queries))
    intervals = list(intervals) + [empty] * (INTERVALS - len(intervals))
    return SlotPlan(
        queries,
        keys[0] if len(keys) == 1 else torch.cat(keys),
        torch.stack([lo for lo, _ in intervals]),
        torch.stack([hi for _, hi in intervals]),
        natural_queries=q_pos is None,
        natural_keys=regions == [None],
    )


def _tile_extremes(table: Tensor, fill: int, reduce: str) -> Tensor:
    """Per query tile, the min or max over its rows of a [INTERVALS, M] table."""
    padded = torch.nn.functional.pad(table, (0, tiles(table.shape[-1]) * TILE - table.shape[-1]))
    if padded.shape[-1] != table.shape[-1]:
        padded[:, table.shape[-1] :] = fill
    rows = padded.view(table.shape[0], -1, TILE)
    return rows.amin(-1) if reduce == "min" else rows.amax(-1)


def tile_grids(plan: SlotPlan) -> tuple[Tensor, Tensor]:
    """(read, full) bool [q tiles, kv tiles] of a plan."""
    big = plan.k_pos.numel() + 1
    empty = plan.lo > plan.hi
    # Read: the union of the rows' intervals; an empty interval and a padding row read nothing.
    lowest = _tile_extremes(plan.lo.masked_fill(empty, big), big, "min")[..., None]
    highest = _tile_extremes(plan.hi.masked_fill(empty, -1), -1, "max")[..., None]
    # Full: inside every row's interval; an empty one contains nothing, padding rows everything.
    inner_lo = _tile_extremes(plan.lo.masked_fill(empty, big), -1, "max")[..., None]
    inner_hi = _tile_extremes(plan.hi.masked_fill(empty, -1), big, "min")[..., None]
    first = torch.arange(tiles(plan.k_pos.numel()), device=plan.lo.device) * TILE
    last = (first + TILE - 1).clamp(max=plan.k_pos.numel() - 1)
    read = ((first <= highest) & (last >= lowest)).any(0)
    full = ((first >= inner_lo) & (last <= inner_hi)).any(0)
    return read, full


def _padded(table: Tensor, length: int, value: int) -> Tensor:
    return torch.nn.functional.pad(table, (0, length - table.shape[-1]), value=value)


@dataclass(frozen=True, eq=False)
class _Prepared:
    """A plan padded to its compiled shapes: query and key slots up to `bucket` lengths (padding
    queries read nothing, padding keys lie in no interval), with its BlockMask."""

    plan: SlotPlan
    block_mask: object
    q_pos: Tensor  # [bucket(Mq)], for the gather and score_mod
    k_pos: Tensor  # [bucket(Mk)]
    q_slot_of_pos: Tensor | None  # inverse of the query order (None: natural)


def _prepare(plan: SlotPlan) -> _Prepared:
    mq, mk = bucket(plan.q_pos.numel()), bucket(plan.k_pos.numel())
    lo, hi = _padded(plan.lo, mq, 1), _padded(plan.hi, mq, 0)
    padded = SlotPlan(
        _padded(plan.q_pos, mq, 0),
        _padded(plan.k_pos, mk, 0),
        lo,
        hi,
        plan.natural_queries,
        plan.natural_keys,
    )

    def mask_mod(batch, head, q_idx, kv_idx):
        first = (kv_idx >= lo[0, q_idx]) & (kv_idx <= hi[0, q_idx])
        return first | ((kv_idx >= lo[1, q_idx]) & (kv_idx <= hi[1, q_idx]))

    read, full = tile_grids(padded)
    return _Prepared(
        plan,
        block_mask_from_tiles(read[None, None], full[None, None], mask_mod, mq, mk),
        padded.q_pos,
        padded.k_pos,
        None if plan.natural_queries else torch.argsort(plan.q_pos),
    )


# A plain dict, not an lru_cache: dynamo traces through lru_cache wrappers, but reads a dict
# entry that exists as it is, so a compiled block takes the cached tables as inputs.
_PREPARED: dict[tuple, tuple[_Prepared, ...]] = {}
# Entries kept: (component, length, device) combinations of a run; past this the cache restarts.
PREPARED_ENTRIES = 256


def prepared_plans(component, n: int, device: torch.device) -> tuple[_Prepared, ...]:
    """A component's plans with their BlockMasks, built once per length and device."""
    key = (component, n, device)
    if key not in _PREPARED:
        if len(_PREPARED) >= PREPARED_ENTRIES:
            _PREPARED.clear()
        _PREPARED[key] = tuple(_prepare(plan) for plan in component.slot_plans(n, device))
    return _PREPARED[key]


def prepare_flex_pattern(pattern, n: int, device: torch.device) -> None:
    """Build the plans of every head group of `pattern` for length n (outside compiled code)."""
    for _, _, component in pattern.groups:
        prepared_plans(component, n, device)


def _slots(x: Tensor, positions: Tensor, natural: bool) -> Tensor:
    """x [B, H, N, D] at the given slots: a zero-padded copy in natural order, else a gather."""
    if natural:
        return torch.nn.functional.pad(x, (0, 0, 0, len(positions) - x.shape[2]))
    return x.index_select(2, positions)


def _attend_plan(q, k, v, prepared: _Prepared, slopes: Tensor | None, with_lse: bool):
    plan, n = prepared.plan, q.shape[2]
    q = _slots(q, prepared.q_pos, plan.natural_queries)
    k = _slots(k, prepared.k_pos, plan.natural_keys)
    v = _slots(v, prepared.k_pos, plan.natural_keys)
    score_mod = None if slopes is None else alibi_score_mod(slopes, prepared.q_pos, prepared.k_pos)
    result = flex(q, k, v, prepared.block_mask, score_mod, with_lse=with_lse)
    out, lse = result if with_lse else (result, None)
    if prepared.q_slot_of_pos is None:
        return out[:, :, :n], None if lse is None else lse[:, :, :n]
    out = out.index_select(2, prepared.q_slot_of_pos)  # back to natural order
    return out, None if lse is None else lse.index_select(2, prepared.q_slot_of_pos)


def flex_pattern_attention(q: Tensor, k: Tensor, v: Tensor, pattern, slopes: Tensor | None):
    """Attention of q, k, v [B, H, N, D] under `pattern` (patterns.LayerPattern) with Flex."""
    n, outputs = q.shape[-2], []
    slopes = None if slopes is None else slopes.to(device=q.device, dtype=torch.float32)
    for first, end, component in pattern.groups:
        heads = slice(first, end)
        plans = prepared_plans(component, n, q.device)
        group_slopes = None if slopes is None else slopes[heads]
        with_lse = len(plans) > 1
        results = [
            _attend_plan(q[:, heads], k[:, heads], v[:, heads], plan, group_slopes, with_lse)
            for plan in plans
        ]
        outputs.append(merge_by_lse(results, q.dtype) if with_lse else results[0][0])
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, 1)


def tile_counts(pattern, n: int) -> tuple[int, int]:
    """(tiles read, causal tiles) summed over heads: the Flex cost of `pattern` at length n
    against dense causal attention's, in 128 x 128 tiles."""
    causal = tiles(n) * (tiles(n) + 1) // 2
    read = 0
    for first, end, component in pattern.groups:
        plans = component.slot_plans(n, torch.device("cpu"))
        read += (end - first) * sum(int(tile_grids(plan)[0].sum()) for plan in plans)
    return read, causal * pattern.n_head
