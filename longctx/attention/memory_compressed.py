"""Local and memory-compressed attention of Liu et al. 2018 (the T-DMCA decoder's "LMLML" stack).

Memory-compressed layer, with k = compression: the projected keys and values of every complete
block of k positions (block m covers mk .. mk+k-1) are compressed by a learned strided
convolution (kernel = stride = k, over all d_model channels, as the paper convolves the
projected K and V) into one slot. Query i attends, under one softmax, to
  (a) the raw keys of its own block up to itself: floor(j/k) == floor(i/k), j <= i;
  (b) the slot of every block that is complete at i, i.e. ends at or before i: mk+k-1 <= i.
When i is the last position of its block, that block's slot is visible too: it holds no position
after i (docs/attention.md: "end at or before i"). A slot mixing in any position after i never
reaches i.

Slots carry the position of their block's last token, mk+k-1, for RoPE (slot keys are rotated
after compression, so scores stay relative) and ALiBi (distance i - (mk+k-1)).

Compute: queries go in chunks of about QUERY_CHUNK, each one fused SDPA call over [the slots
complete by the chunk's end ; the chunk's raw keys] under the exact mask: O(N·(N/k + QUERY_CHUNK))
work, and O(N) memory because each chunk is recomputed in backward instead of keeping its copy
of the keys. Streaming keeps the pending block's raw keys and values plus every slot so far.

Local layer (alternate: true, even layers): causal attention inside blocks of block_size, the
`local` pattern with look_back 0: floor(j/b) == floor(i/b), j <= i.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from longctx.attention.base import Backend, HeadMixer, Mixer, ModelSettings, State, split_qkv
from longctx.attention.registry import register
from longctx.attention.softmax import AttentionCore, SoftmaxAttention
from longctx.core.positions import Rotary, alibi_bias, alibi_slopes
from longctx.errors import ConfigError
from longctx.ops.head_parallel import across_heads
from longctx.ops.pieces import split_into_pieces
from longctx.ops.softmax.masked import masked_attention

# About this many queries per SDPA call of the compressed layer (rounded down to whole blocks):
# a call's mask and copied keys are then QUERY_CHUNK x (visible slots + QUERY_CHUNK), and the
# fused kernel keeps the rest O(N). Fewer queries repeat the visible slots in more calls; more
# grow every call's mask and key copy: a few hundred keeps both small.
QUERY_CHUNK = 256


class BlockLocalCore(AttentionCore):
    """Causal attention inside consecutive blocks of `block_size` positions (look_back 0)."""

    def __init__(self, block_size: int):
        super().__init__()
        self.block_size = block_size

    def forward(self, q: Tensor, k: Tensor, v: Tensor, slopes: Tensor | None) -> Tensor:
        b = self.block_size
        batch, heads, n, head_dim = q.shape
        n_blocks = -(-n // b)
        # Padding goes at the end: padded keys follow every real query,
        # so the causal mask hides them.
        pad = (0, 0, 0, n_blocks * b - n)

        def blocks(t: Tensor) -> Tensor:
            return F.pad(t, pad).reshape(batch, heads * n_blocks, b, head_dim)

        if slopes is None:
            o = F.scaled_dot_product_attention(blocks(q), blocks(k), blocks(v), is_causal=True)
        else:
            pos = torch.arange(b, device=q.device)
            bias = alibi_bias(slopes, pos, pos).masked_fill(
                pos[None, :] > pos[:, None], float("-inf")
            )
            bias = bias[:, None].expand(heads, n_blocks, b, b).reshape(heads * n_blocks, b, b)
            # 4-D, like the inputs: a 3-D mask sends CPU SDPA to its unfused math path.
            o = F.scaled_dot_product_attention(
                blocks(q), blocks(k), blocks(v), attn_mask=bias[None].to(q.dtype)
            )
        return o.reshape(batch, heads, n_blocks * b, head_dim)[:, :, :n]

    def init_cache(self, batch: int, heads: int, head_dim: int, like: Tensor) -> State:
        empty = like.new_zeros(batch, heads, 0, head_dim)
        return {"k": empty, "v": empty}

    def step(self, q, k, v, cache, start, slopes):
        b = self.block_size
        keys = torch.cat((cache["k"], k), dim=2)
        values = torch.cat((cache["v"], v), dim=2)
        end = start + q.shape[-2]
        q_pos = torch.arange(start, end, device=q.device)
        k_pos = torch.arange(end - keys.shape[-2], end, device=q.device)
        allowed = (k_pos[None, :] // b == q_pos[:, None] // b) & (k_pos[None, :] <= q_pos[:, None])
        o = masked_attention(q, keys, values, allowed[None, None], q_pos, k_pos, slopes)
        keep = end - ((end - 1) // b) * b  # positions of the block holding the last token
        return o, {"k": keys[:, :, -keep:], "v": values[:, :, -keep:]}


def compressed_attention(
    q: Tensor,
    raw_k: Tensor,
    raw_v: Tensor,
    slot_k: Tensor,
    slot_v: Tensor,
    start: int,
    compression: int,
    slopes: Tensor | None,
) -> Tensor:
    """Memory-compressed attention of the queries at positions start .. start+n-1.

    raw_k / raw_v [B,H,r,Dh] hold the keys from the start of the block containing `start` up to
    the last query; slot_k / slot_v [B,H,S,Dh] hold the slots of the blocks that end by then.
    Queries go in chunks whose bounds are block-aligned absolute positions, so each chunk's raw
    keys are its own positions; a chunk also takes every slot complete by its end. Inputs are
    cut with longctx.ops.pieces.split_into_pieces (split, not slice).
    """
    end = start + q.shape[-2]
    raw_start = start - start % compression
    chunk = compression * max(1, QUERY_CHUNK // compression)
    bounds = [start, *range((start // chunk + 1) * chunk, end, chunk), end]
    query_sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    raw_sizes = [bounds[1] - raw_start, *query_sizes[1:]]
    visible = [min(slot_k.shape[-2], b // compression) for b in bounds[1:]]
    slot_sizes = [b - a for a, b in zip([0, *visible], visible)]
    q_chunks = split_into_pieces(q, query_sizes, dim=2)
    raw_k_chunks, raw_v_chunks = (split_into_pieces(t, raw_sizes, dim=2) for t in (raw_k, raw_v))
    slot_k_pieces, slot_v_pieces = (
        split_into_pieces(t, slot_sizes, dim=2) for t in (slot_k, slot_v)
    )
    all_slot_end = torch.arange(slot_k.shape[-2], device=q.device) * compression + compression - 1
    outputs = []
    for c, (first, last) in enumerate(zip(bounds, bounds[1:])):
        block_start = first - first % compression
        q_pos = torch.arange(first, last, device=q.device)
        raw_pos = torch.arange(block_start, last, device=q.device)
        slot_end = all_slot_end[: visible[c]]
        i, j = q_pos[:, None], raw_pos[None, :]
        own_block = (j // compression == i // compression) & (j <= i)
        allowed = torch.cat((slot_end[None, :] <= i, own_block), dim=1)
        attend = partial(
            _chunk_attention, c + 1, allowed, q_pos, torch.cat((slot_end, raw_pos)), slopes
        )
        chunk_inputs = (
            q_chunks[c],
            raw_k_chunks[c],
            raw_v_chunks[c],
            *slot_k_pieces[: c + 1],
            *slot_v_pieces[: c + 1],
        )
        if torch.is_grad_enabled():
            # Recomputed in backward: keeping every chunk's concatenated keys for SDPA's backward
            # would cost O(N²/(k·QUERY_CHUNK)) memory; this costs one more forward of the chunk.
            outputs.append(checkpoint(attend, *chunk_inputs, use_reentrant=False))
        else:
            outputs.append(attend(*chunk_inputs))
    return torch.cat(outputs, dim=2)


class _OwnGradient(torch.autograd.Function):
    """Identity whose backward copies the gradient. The gradient of a torch.cat input is a view of
    the whole concatenation's gradient: accumulated across chunks, such views would keep every
    chunk's key gradient alive until the end of backward."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.clone()


def _chunk_attention(
    n_slot_pieces, allowed, q_pos, k_pos, slopes, queries, raw_k, raw_v, *slot_pieces
):
    """One query chunk over [its visible slots ; its raw keys];
    slot_pieces: k pieces, then v pieces."""
    keys = torch.cat([_OwnGradient.apply(t) for t in (*slot_pieces[:n_slot_pieces], raw_k)], dim=2)
    values = torch.cat(
        [_OwnGradient.apply(t) for t in (*slot_pieces[n_slot_pieces:], raw_v)], dim=2
    )
    # A 4-D mask keeps SDPA on its fused CPU kernel (a 3-D one falls back to the math path).
    return masked_attention(queries, keys, values, allowed[None, None], q_pos, k_pos, slopes)


class MemoryCompressedAttention(HeadMixer):
    def __init__(self, dims: ModelSettings, compression: int):
        super().__init__()
        self.n_head = dims.n_head
        self.head_dim = dims.head_dim
        self.compression = compression
        self.qkv = nn.Linear(dims.d_model, 3 * dims.d_model, bias=dims.bias)
        self.out = nn.Linear(dims.d_model, dims.d_model, bias=dims.bias)
        conv = dict(kernel_size=compression, stride=compression, bias=dims.bias)
        self.compress_k = nn.Conv1d(dims.d_model, dims.d_model, **conv)
        self.compress_v = nn.Conv1d(dims.d_model, dims.d_model, **conv)
        self.rotary = Rotary(self.head_dim, dims.rope_base) if dims.position == "rope" else None
        slopes = alibi_slopes(dims.n_head) if dims.position == "alibi" else None
        self.register_buffer("slopes", slopes, persistent=False)
        self.init_weights(dims.n_layer)

    def init_weights(self, n_layer: int) -> None:
        super().init_weights(n_layer)
        # Start as mean pooling: a slot is first the average key/value of its block, which keeps
        # its scores on the scale of raw keys; training then learns the compression.
        for conv in (self.compress_k, self.compress_v):
            with torch.no_grad():
                conv.weight.zero_()
                conv.weight[torch.arange(conv.in_channels), torch.arange(conv.in_channels)] = (
                    1 / self.compression
                )
                if conv.bias is not None:
                    conv.bias.zero_()

    def _rotate(self, t: Tensor, first_position: int, spacing: int = 1) -> Tensor:
        if self.rotary is None:
            return t
        positions = torch.arange(t.shape[-2], device=t.device) * spacing + first_position
        return self.rotary(t, positions)

    def _tokens(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Unrotated q, k, v [B, H, n, Dh]."""
        return split_qkv(self.qkv(x), self.n_head)

    def _compress(self, k: Tensor, v: Tensor, first_block: int) -> tuple[Tensor, Tensor]:
        """Slots of the complete blocks in k, v [B,H,mk,Dh] (unrotated; block first_block first).

        The strided conv runs as one matmul over the flattened blocks: the same numbers as
        nn.Conv1d with kernel = stride, which also accepts zero blocks (a streaming step may
        complete none).
        """
        batch, heads, n, head_dim = k.shape
        d_model = heads * head_dim

        def conv(t: Tensor, layer: nn.Conv1d) -> Tensor:
            blocks = t.transpose(1, 2).reshape(
                batch, n // self.compression, self.compression, d_model
            )
            blocks = blocks.transpose(2, 3).reshape(
                batch, -1, d_model * self.compression
            )  # (channel, tap)
            slots = F.linear(blocks, layer.weight.reshape(d_model, -1), layer.bias)
            return slots.view(batch, -1, heads, head_dim).transpose(1, 2)

        slot_k = conv(k, self.compress_k)
        last_token = first_block * self.compression + self.compression - 1
        return self._rotate(slot_k, last_token, self.compression), conv(v, self.compress_v)

    def project(self, x: Tensor, start: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """q, k (rotated), v [B,H,n,Dh] and the slots of the complete blocks [B,H,n//k,Dh].

        Blocks are aligned to absolute positions, so `start` must be a multiple of compression.
        """
        if start % self.compression:
            raise ValueError(
                f"project needs a block-aligned start, got {start} "
                f"with compression {self.compression}"
            )
        q, k, v = self._tokens(x)
        complete = (x.shape[1] // self.compression) * self.compression
        slot_k, slot_v = self._compress(
            k[:, :, :complete], v[:, :, :complete], start // self.compression
        )
        return self._rotate(q, start), self._rotate(k, start), v, slot_k, slot_v

    def mix(self, q: Tensor, k: Tensor, v: Tensor, slot_k: Tensor, slot_v: Tensor) -> Tensor:
        return across_heads(
            compressed_attention,
            (q, k, v, slot_k, slot_v, 0, self.compression, self.slopes),
            (1, 1, 1, 1, 1, None, None, 0),
        )

    def init_state(self, batch_size: int) -> State:
        """The pending (incomplete) block's unrotated keys and values, and all slots so far."""
        empty = self.out.weight.new_zeros(batch_size, self.n_head, 0, self.head_dim)
        return {"k": empty, "v": empty, "slot_k": empty, "slot_v": empty}

    def step(self, x: Tensor, state: State, start: int) -> tuple[Tensor, State]:
        q, k, v = self._tokens(x)
        pending = state["k"].shape[2]
        raw_start = start - pending
        raw_k = torch.cat((state["k"], k), dim=2)
        raw_v = torch.cat((state["v"], v), dim=2)
        complete = (raw_k.shape[2] // self.compression) * self.compression
        new_k, new_v = self._compress(
            raw_k[:, :, :complete], raw_v[:, :, :complete], raw_start // self.compression
        )
        slot_k = torch.cat((state["slot_k"], new_k), dim=2)
        slot_v = torch.cat((state["slot_v"], new_v), dim=2)
        o = compressed_attention(
            self._rotate(q, start),
            self._rotate(raw_k, raw_start),
            raw_v,
            slot_k,
            slot_v,
            start,
            self.compression,
            self.slopes,
        )
        state = {
            "k": raw_k[:, :, complete:],
            "v": raw_v[:, :, complete:],
            "slot_k": slot_k,
            "slot_v": slot_v,
        }
        return self.merge_heads(o), state


def _block_local_pairs(seq_len: int, block: int) -> int:
    """Sum over i of the keys j <= i in i's block of `block` positions."""
    full, rest = divmod(seq_len, block)
    return full * block * (block + 1) // 2 + rest * (rest + 1) // 2


@register
class MemoryCompressed(Backend):
    name = "memory_compressed"

    @dataclass(frozen=True)
    class Options:
        compression: int = 3
        block_size: int = 256
        alternate: bool = True

    def validate(self) -> None:
        o = self.options
        if not isinstance(o.compression, int) or o.compression < 2:
            raise ConfigError(
                "attention.compression must be an integer >= 2 (positions per compressed slot), "
                f"got {o.compression!r}"
            )
        if not isinstance(o.block_size, int) or o.block_size < 1:
            raise ConfigError(
                f"attention.block_size must be a positive integer, got {o.block_size!r}"
            )
        if not isinstance(o.alternate, bool):
            raise ConfigError(f"attention.alternate must be true or false, got {o.alternate!r}")

    def is_local(self, layer: int) -> bool:
        """LMLML: with alternate, even layers are local and odd layers memory-compressed."""
        return self.options.alternate and layer % 2 == 0

    def mixer(self, layer: int) -> Mixer:
        if self.is_local(layer):
            return SoftmaxAttention(self.dims, BlockLocalCore(self.options.block_size))
        return MemoryCompressedAttention(self.dims, self.options.compression)

    def attention_flops(self, seq_len: int) -> float:
        """Mean over the layers (n_layer x this is the stack's total):
        QK^T and PV over the allowed pairs.

        The compression conv is a projection (O(N d²), like q/k/v) and is not counted here.
        """
        k = self.options.compression
        blocks, rest = divmod(seq_len + 1, k)  # sum over i of the complete blocks floor((i+1)/k)
        compressed = _block_local_pairs(seq_len, k) + k * blocks * (blocks - 1) // 2 + blocks * rest
        local = _block_local_pairs(seq_len, self.options.block_size)
        n_layer = self.dims.n_layer
        n_local = sum(self.is_local(layer) for layer in range(n_layer))
        pairs = (n_local * local + (n_layer - n_local) * compressed) / n_layer
        return 2 * 2 * pairs * self.dims.d_model
