"""Transformer-XL attention (Dai et al. 2019): segment recurrence with relative positions.

The sequence is cut into consecutive segments of L = segment_length positions (aligned to
absolute position 0). In every layer, the queries of a segment attend causally to their own
segment and to the memory: the layer's inputs at the last mem_len positions before the segment,
with gradients stopped through those inputs (the projection weights still learn from them, as
in the paper, which projects the stop-gradient hidden states). One-layer receptive field of
query i at offset r = i mod L: j <= i and i - j <= mem_len + r.

Scores, with sinusoidal R, learned W_R and the per-head biases u (content) and v (position):
    A[i, j] = (q_i + u) . k_j + (q_i + v) . W_R R_{i-j}          (times 1/sqrt(Dh))
The position term is computed against R at distances klen-1 .. 0 for every query and moved onto
(i, j) by the relative shift; the region it fills with garbage (j after i) is masked.
R is built on the fly, so the weights do not depend on mem_len: evaluation may use a longer
memory than training (attention.mem_len=... or `memory_length` below).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from longctx.attention.base import Backend, HeadMixer, Mixer, ModelSettings, State
from longctx.attention.registry import register
from longctx.errors import ConfigError
from longctx.ops.head_parallel import across_heads
from longctx.ops.pieces import rows_per_piece, split_into_pieces


def relative_shift(scores: Tensor) -> Tensor:
    """Dai et al.'s shift: [..., l, K] scores against distances K-1 .. 0
    -> scores[..., r, j] at distance K-l+r-j.

    Queries are the last l of the K key positions. Valid where j <= K-l+r; the rest is garbage.
    """
    *batch, qlen, klen = scores.shape
    padded = F.pad(scores, (1, 0))
    return padded.view(*batch, klen + 1, qlen)[..., 1:, :].reshape(*batch, qlen, klen)


def sinusoid(distances: Tensor, d_model: int) -> Tensor:
    """R [n, d_model] = [sin(d w_f), cos(d w_f)], w_f = 10000^(-2f/d_model), in fp64."""
    inv_freq = 10000.0 ** (
        -torch.arange(0, d_model, 2, dtype=torch.float64, device=distances.device) / d_model
    )
    angles = distances.to(torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat((angles.sin(), angles.cos()), dim=-1)


class TransformerXLAttention(HeadMixer):
    def __init__(self, dims: ModelSettings, segment_length: int, mem_len: int):
        super().__init__()
        self.n_head = dims.n_head
        self.head_dim = dims.head_dim
        self.d_model = dims.d_model
        self.segment_length = segment_length
        self.mem_len = mem_len  # a plain attribute: no weight depends on it
        self.qkv = nn.Linear(dims.d_model, 3 * dims.d_model, bias=dims.bias)
        self.out = nn.Linear(dims.d_model, dims.d_model, bias=dims.bias)
        self.position_proj = nn.Linear(dims.d_model, dims.d_model, bias=False)  # W_R
        self.content_bias = nn.Parameter(torch.empty(dims.n_head, 1, dims.head_dim))  # u
        self.position_bias = nn.Parameter(torch.empty(dims.n_head, 1, dims.head_dim))  # v
        self.init_weights(dims.n_layer)

    def init_weights(self, n_layer: int) -> None:
        super().init_weights(n_layer)
        nn.init.normal_(self.content_bias, std=0.02)  # as the reference code's init_std
        nn.init.normal_(self.position_bias, std=0.02)

    def _heads(self, t: Tensor) -> Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.n_head, self.head_dim).transpose(1, 2)

    def _memory_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """k, v of the stop-gradient inputs: no gradient reaches x, the weights still get one."""
        d = self.d_model
        bias = None if self.qkv.bias is None else self.qkv.bias[d:]
        k, v = F.linear(x.detach(), self.qkv.weight[d:], bias).chunk(2, dim=-1)
        return self._heads(k), self._heads(v)

    def _relative_keys(self, klen: int, like: Tensor) -> Tensor:
        """W_R R for distances klen-1 .. 0, as [H, klen, Dh]."""
        distances = torch.arange(klen - 1, -1, -1, device=like.device)
        r = self.position_proj(sinusoid(distances, self.d_model).to(like.dtype))
        return r.view(klen, self.n_head, self.head_dim).transpose(0, 1)

    def attend(
        self, q: Tensor, keys: Tensor, values: Tensor, allowed: Tensor, relative_keys: Tensor
    ) -> Tensor:
        """relative_attention with this layer's biases u and v."""
        return relative_attention(
            q, keys, values, allowed, relative_keys, self.content_bias, self.position_bias
        )

    def project(self, x: Tensor, start: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """q, k, v [B,H,n,Dh] and the memory's k, v (the same values, from the stop-gradient input).

        Nothing here depends on positions (they enter as relative distances in `mix`); `start`
        is part of the common signature only.
        """
        q, k, v = (self._heads(t) for t in self.qkv(x).chunk(3, dim=-1))
        return (q, k, v, *self._memory_kv(x))

    def mix(self, q: Tensor, k: Tensor, v: Tensor, memory_k: Tensor, memory_v: Tensor) -> Tensor:
        return self._segment_windows(q, k, v, memory_k, memory_v, earlier=0)

    def _segment_windows(
        self, q: Tensor, k: Tensor, v: Tensor, memory_k: Tensor, memory_v: Tensor, earlier: int
    ) -> Tensor:
        """segment_windows of q, k, v with this layer's memory, segments and weights, the heads
        split across a CPU's threads (longctx.ops.head_parallel)."""
        relative_keys = self._relative_keys(self.mem_len + self.segment_length, q)
        args = (q, k, v, memory_k, memory_v, relative_keys, self.content_bias, self.position_bias)
        settings = (earlier, self.segment_length, self.mem_len)
        return across_heads(
            segment_windows, (*args, *settings), (1, 1, 1, 1, 1, 0, 0, 0, None, None, None)
        )

    def init_state(self, batch_size: int) -> State:
        """memory: detached inputs of the last mem_len positions before the current segment;
        segment: the inputs of the current segment so far (empty at segment boundaries), kept with
        their graph: as in forward, gradients stop at segment boundaries, not at chunk boundaries.
        """
        empty = self.out.weight.new_zeros(batch_size, 0, self.d_model)
        return {"memory": empty, "segment": empty}

    def step(self, x: Tensor, state: State, start: int) -> tuple[Tensor, State]:
        memory, segment = state["memory"], state["segment"]
        if segment.shape[1] != start % self.segment_length:
            raise ValueError(
                f"state holds {segment.shape[1]} positions of the current segment "
                f"but start={start} is at offset {start % self.segment_length}"
            )
        outputs = []
        if segment.shape[1]:  # first the rest of the current segment
            piece = x[:, : self.segment_length - segment.shape[1]]
            segment = torch.cat((segment, piece), dim=1)
            outputs.append(self._attend_piece(piece, memory, segment))
            x = x[:, piece.shape[1] :]
            if segment.shape[1] == self.segment_length:
                memory, segment = self._remember(memory, segment), segment[:, :0]
        if x.shape[1]:  # then whole segments (and a partial last one) at once, as in forward
            q, k, v, chunk_k, chunk_v = self.project(x)
            memory_k, memory_v = self._memory_kv(memory)
            outputs.append(
                self._segment_windows(
                    q,
                    k,
                    v,
                    torch.cat((memory_k, chunk_k), dim=2),
                    torch.cat((memory_v, chunk_v), dim=2),
                    memory.shape[1],
                )
            )
            whole = x.shape[1] - x.shape[1] % self.segment_length
            memory, segment = self._remember(memory, x[:, :whole]), x[:, whole:]
        return self.merge_heads(torch.cat(outputs, dim=2)), {"memory": memory, "segment": segment}

    def _remember(self, memory: Tensor, finished: Tensor) -> Tensor:
        """The memory after whole segments `finished`: the last mem_len inputs (maybe spanning
        several segments), their gradient stopped."""
        memory = torch.cat((memory, finished.detach()), dim=1)
        return memory[:, max(0, memory.shape[1] - self.mem_len) :]

    def _attend_piece(self, piece: Tensor, memory: Tensor, segment: Tensor) -> Tensor:
        """Attention of `piece` (the last positions of `segment`) over [memory ; segment]."""
        d, weight, bias = self.d_model, self.qkv.weight, self.qkv.bias
        q = self._heads(F.linear(piece, weight[:d], None if bias is None else bias[:d]))
        k, v = (
            self._heads(t)
            for t in F.linear(segment, weight[d:], None if bias is None else bias[d:]).chunk(2, -1)
        )
        memory_k, memory_v = self._memory_kv(memory)
        keys, values = torch.cat((memory_k, k), dim=2), torch.cat((memory_v, v), dim=2)
        klen, qlen = keys.shape[2], piece.shape[1]
        key_index = torch.arange(klen, device=piece.device)
        query_index = klen - qlen + torch.arange(qlen, device=piece.device)
        allowed = key_index[None, :] <= query_index[:, None]
        return self.attend(q, keys, values, allowed[None, None], self._relative_keys(klen, q))


def relative_attention(
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    allowed: Tensor,
    relative_keys: Tensor,
    content_bias: Tensor,
    position_bias: Tensor,
) -> Tensor:
    """q [b,H,l,Dh] are the last l of the positions of keys/values [b,H,K,Dh];
    allowed [b|1,1,l,K]; relative_keys = W_R R for distances K-1 .. 0 [H,K,Dh];
    content_bias u and position_bias v [H,1,Dh]."""
    scale = q.shape[-1] ** -0.5  # applied to the (small) queries rather than to the scores
    content = ((q + content_bias) * scale) @ keys.transpose(-1, -2)
    position = relative_shift(((q + position_bias) * scale) @ relative_keys.transpose(-1, -2))
    scores = (content + position).masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
    return weights.to(values.dtype) @ values


def segment_windows(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    memory_k: Tensor,
    memory_v: Tensor,
    relative_keys: Tensor,
    content_bias: Tensor,
    position_bias: Tensor,
    earlier: int,
    seg: int,
    mem: int,
) -> Tensor:
    """Queries q [B,H,n,Dh] at positions 0..n-1, segments of `seg` starting at 0; k, v their
    keys/values.

    memory_k / memory_v [B,H,earlier+n,Dh]: stop-gradient keys/values of the `earlier` positions
    before 0 (a streaming memory) and of positions 0..n-1. Every segment gets its key window
    [memory ; segment] of mem + seg keys; groups of segments are scored together (about
    longctx.ops.pieces.TRANSIENT_SCORES scores at a time, whole segments).
    """
    batch, heads, n, head_dim = q.shape
    n_seg = -(-n // seg)
    device = q.device
    # Queries past n pad the last segment; the keys they add follow every real query (masked).
    pad = (0, 0, 0, n_seg * seg - n)

    def segment_major(t: Tensor) -> Tensor:  # [B, H, S, m, Dh] -> [S*B, H, m, Dh]
        return t.permute(2, 0, 1, 3, 4).reshape(n_seg * batch, heads, -1, head_dim)

    def segments(t: Tensor) -> Tensor:
        return F.pad(t, pad).view(batch, heads, n_seg, seg, head_dim)

    segment_start = torch.arange(n_seg, device=device)[:, None] * seg
    memory_pos = segment_start - mem + torch.arange(mem, device=device)  # [S, M]
    gather = (memory_pos + earlier).clamp(min=0)

    def windows(t: Tensor, memory: Tensor) -> Tensor:
        return segment_major(torch.cat((memory[:, :, gather], segments(t)), dim=3))

    query_pos = segment_start + torch.arange(seg, device=device)
    key_pos = torch.cat((memory_pos, query_pos), dim=1)
    exists = key_pos >= -earlier
    allowed = exists[:, None, :] & (key_pos[:, None, :] <= query_pos[:, :, None])  # [S, L, M+L]
    allowed = (
        allowed[:, None, None]
        .expand(-1, batch, -1, -1, -1)
        .reshape(n_seg * batch, 1, seg, mem + seg)
    )
    # Whole segments per group (the softmax weights kept for backward stay O(N (mem + L) H)).
    rows = batch * rows_per_piece(batch * heads * seg * (mem + seg))
    groups = zip(
        *(
            split_into_pieces(t, rows)
            for t in (
                segment_major(segments(q)),
                windows(k, memory_k),
                windows(v, memory_v),
                allowed,
            )
        )
    )
    o = torch.cat(
        [relative_attention(*group, relative_keys, content_bias, position_bias) for group in groups]
    )
    o = o.view(n_seg, batch, heads, seg, head_dim).permute(1, 2, 0, 3, 4)
    return o.reshape(batch, heads, n_seg * seg, head_dim)[:, :, :n]


def transformer_xl_layers(model: nn.Module) -> list[TransformerXLAttention]:
    layers = [m for m in model.modules() if isinstance(m, TransformerXLAttention)]
    if not layers:
        raise ValueError("the model has no transformer_xl layer")
    return layers


@contextlib.contextmanager
def memory_length(model: nn.Module, mem_len: int) -> Iterator[None]:
    """Temporarily run every Transformer-XL layer of `model` with `mem_len`
    (0 switches memory off)."""
    layers = transformer_xl_layers(model)
    saved = [layer.mem_len for layer in layers]
    for layer in layers:
        layer.mem_len = mem_len
    try:
        yield
    finally:
        for layer, value in zip(layers, saved):
            layer.mem_len = value


@register
class TransformerXL(Backend):
    name = "transformer_xl"
    ordered_stream = True

    @dataclass(frozen=True)
    class Options:
        segment_length: int = 512
        mem_len: int = 512

    def validate(self) -> None:
        o = self.options
        if not isinstance(o.segment_length, int) or o.segment_length < 1:
            raise ConfigError(
                f"attention.segment_length must be a positive integer, got {o.segment_length!r}"
            )
        if not isinstance(o.mem_len, int) or o.mem_len < 0:
            raise ConfigError(
                f"attention.mem_len must be an integer >= 0 (0 = no memory), got {o.mem_len!r}"
            )
        if self.dims.position in ("alibi", "learned"):
            raise ConfigError(
                f"attention=transformer_xl brings its own relative position encoding and cannot be "
                f"combined with model.position={self.dims.position}; use model.position=rope (the "
                "default) or none, which both mean 'Transformer-XL relative positions only'"
            )
        if self.dims.d_model % 2:
            raise ConfigError(
                f"attention=transformer_xl needs an even model.d_model for its sinusoidal relative "
                f"encoding (sin/cos pairs), got {self.dims.d_model}"
            )

    def mixer(self, layer: int) -> Mixer:
        return TransformerXLAttention(self.dims, self.options.segment_length, self.options.mem_len)

    def attention_flops(self, seq_len: int) -> float:
        """QK^T and PV over the allowed pairs,
        plus the position term over each query's full key row.

        Projections (q/k/v/out and W_R R) are not counted.
        """
        seg, mem, d = self.options.segment_length, self.options.mem_len, self.dims.d_model
        total = 0
        for start in range(0, seq_len, seg):
            length = min(seg, seq_len - start)
            memory = min(mem, start)
            pairs = length * memory + length * (length + 1) // 2
            total += 2 * 2 * pairs * d + 2 * length * (memory + length) * d
        return float(total)
