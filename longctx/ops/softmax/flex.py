"""FlexAttention as every Flex-backed kernel calls it: one compiled function, BlockMasks from
tile grids, ALiBi as a score_mod, and a bound on recompilation.

- Uncompiled, FlexAttention runs an unfused path that materialises the N x N scores, so calls go
  through one `torch.compile`d flex_attention per process; inside a compiled region
  (`compile: true`) the call is traced into that region instead.
- Each compiled kernel is specialised to its shapes (dynamic shapes miscompile the CPU kernel
  with a score_mod in torch 2.13), so callers pad sequences to `bucket(length)`: a few sizes
  per octave, and evaluating many lengths compiles a bounded number of kernels. mask_mod and
  score_mod read only tensors (per-slot tables), never Python numbers, so every pattern of the
  same shapes shares one compiled kernel.
- Past RECOMPILE_LIMIT variants dynamo would fall back to the unfused path without a word;
  here reaching the limit raises.
- A BlockMask is given as two tile grids: the tiles each query tile reads, and among them the
  full ones, where every pair is allowed and mask_mod does not run.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from longctx.ops.launches import run_opaque

# FlexAttention's tile: BlockMasks are given at this granularity.
TILE = 128
# Compiled variants of flex_attention allowed per process; reaching the limit is an error. At most
# 8 buckets per octave of length, times dtypes, grad modes, score_mods and head-group shapes.
RECOMPILE_LIMIT = 128
# What one call launches on a GPU (for launch counts, longctx.ops.launches): the fused forward
# kernel; backward: the rowwise delta = sum(dO * O) and the fused dq/dk/dv kernel.
FORWARD_LAUNCHES, BACKWARD_LAUNCHES = 1, 2


@functools.cache
def _compiled() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@torch.library.custom_op("longctx::materialized", mutates_args=())
def _materialized(x: Tensor) -> Tensor:
    return x.clone()


@_materialized.register_fake
def _(x: Tensor) -> Tensor:
    return torch.empty_like(x)


def mask_input(x: Tensor) -> Tensor:
    """A tensor that mask_mod or score_mod reads, as a stored buffer inside a compiled region.

    Inductor's CPU FlexAttention template cannot read a tensor that is still a fused computation
    (torch 2.13 fails with NoValidChoicesError); an opaque copy stores it. Outside compiled
    code, and for tensors that already are inputs (cached tables), nothing is done.
    """
    return _materialized(x) if torch.compiler.is_compiling() else x


def _lse_request() -> dict:
    """The keyword that asks flex_attention for the log-sum-exp (`return_aux` from torch 2.9)."""
    from torch.nn.attention import flex_attention as module

    if hasattr(module, "AuxRequest"):
        return {"return_aux": module.AuxRequest(lse=True)}
    return {"return_lse": True}


def flex(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_mask,
    score_mod: Callable | None = None,
    with_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """flex_attention(q, k, v) [B, H, Mq, D] over keys [B, H, Mk, D]; with_lse adds the natural
    log-sum-exp [B, H, Mq] (-inf and output 0 for a query with no allowed key)."""
    from torch.nn.attention.flex_attention import flex_attention

    kwargs = {
        "score_mod": score_mod,
        "block_mask": block_mask,
        **(_lse_request() if with_lse else {}),
    }
    if torch.compiler.is_compiling():  # traced into the caller's compiled region
        return _unpack(flex_attention(q, k, v, **kwargs), with_lse)

    def call(q: Tensor, k: Tensor, v: Tensor):
        limits = {"recompile_limit": RECOMPILE_LIMIT, "fail_on_recompile_limit_hit": True}
        with torch._dynamo.config.patch(**limits):
            return _unpack(_compiled()(q, k, v, **kwargs), with_lse)

    return run_opaque(call, (q, k, v), FORWARD_LAUNCHES, BACKWARD_LAUNCHES)


def _unpack(result, with_lse: bool):
    """(out, lse) from what flex_attention returned with either keyword, or out alone."""
    if not with_lse:
        return result
    out, aux = result
    return out, getattr(aux, "lse", aux)


def block_mask_from_tiles(read: Tensor, full: Tensor, mask_mod: Callable, q_len: int, kv_len: int):
    """A BlockMask from bool tile grids [B|1, H|1, q tiles, kv tiles]: `read` (every tile holding
    an allowed pair) and `full` (a subset of read: every pair allowed). Built with tensor
    operations only (no host sync), on the grids' device."""
    from torch.nn.attention.flex_attention import BlockMask

    partial = read & ~full

    def ordered(grid: Tensor) -> tuple[Tensor, Tensor]:
        counts = grid.sum(-1, dtype=torch.int32)
        # The tiles a row reads first, in column order: a stable sort of "not read" puts them first.
        indices = torch.sort((~grid).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
        return counts, indices

    kv_counts, kv_indices = ordered(partial)
    full_counts, full_indices = ordered(full)
    return BlockMask.from_kv_blocks(
        kv_counts,
        kv_indices,
        full_counts,
        full_indices,
        BLOCK_SIZE=TILE,
        mask_mod=mask_mod,
        seq_lengths=(q_len, kv_len),
    )


def alibi_score_mod(slopes: Tensor, q_pos: Tensor, k_pos: Tensor) -> Callable:
    """score - slope_h * (i - j), with i and j the positions held by the query and key slots."""

    def score_mod(score, batch, head, q_idx, kv_idx):
        return score - slopes[head] * (q_pos[q_idx] - k_pos[kv_idx])

    return score_mod


def tiles(length: int) -> int:
    return -(-length // TILE)


def bucket(length: int) -> int:
    """The padded length a sequence of `length` runs at: whole tiles, rounded up to one of at
    most 8 sizes per octave (so padding stays under an eighth beyond the last tile)."""
    count = tiles(length)
    step = 1 << max(0, count.bit_length() - 4)
    return -(-count // step) * step * TILE
