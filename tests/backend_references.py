"""Naive references, one per backend: what a layer must compute, written apart from its kernels.

Each reference is `reference(mixer, x, layer, options) -> y`: the output of the mixer of model
layer `layer` (built with `options`) for inputs x [B, N, d_model], from the mixer's own weights.
tests/test_backends_common.py holds every layer of every backend equal to it, outputs and
gradients, so a new backend cannot pass the generic suite while computing another function.

- The softmax patterns are docs/attention.md's predicates written again here (not the patterns
  of longctx.ops.sparse), under one dense masked softmax;
- moba's gate is the definition (q . mean key, stable top-k, ties to the earlier block), not the
  key-sum tree of longctx/ops/moba/gate.py;
- memory_compressed and transformer_xl are scored pair by pair (slots from F.conv1d, R_{i-j}
  written out per pair);
- the linear family (linear, rwkv, aft_*) is its recurrent form: one token at a time through
  the layer's `step`, which runs the per-position definitions (today's recurrences; the linear
  family's own references under longctx/ops/<mechanism>/reference.py can replace this).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

from longctx.core.positions import alibi_bias

Predicate = object  # (h [H,1,1], i [1,n,1], j [1,1,n], layer, options, n_head) -> bool tensor


def _sparse_transformer(a1: Tensor, a2: Tensor, h: Tensor, layer: int, options, n_head: int):
    """layout heads: first half of the heads A1, the rest A2; union: A1 or A2; layers: by layer."""
    if options["layout"] == "union":
        return a1 | a2
    if options["layout"] == "heads":
        return torch.where(h < n_head // 2, a1, a2)
    return a1 if layer % 2 == 0 else a2


def _longformer(h, i, j, layer, o, n_head):
    window = o["window"] if o.get("layer_windows") is None else o["layer_windows"][layer]
    dilation = torch.where(h >= n_head - o["dilated_heads"], o["dilation"], 1)
    windowed = ((i - j) % dilation == 0) & ((i - j) // dilation < window)
    return windowed | (j < o["global_tokens"])


def _blockwise(h, i, j, layer, o, n_head):
    shifts = torch.tensor(o["shifts"])[h // (n_head // len(o["shifts"]))]
    return j // o["block_size"] == i // o["block_size"] - shifts


PREDICATES = {
    "full": lambda h, i, j, layer, o, n_head: torch.ones_like(i - j, dtype=torch.bool),
    "sliding_window": lambda h, i, j, layer, o, n_head: i - j < o["window"],
    "local": lambda h, i, j, layer, o, n_head: (
        (i // o["block_size"] - o["look_back"] <= j // o["block_size"])
        & (j // o["block_size"] <= i // o["block_size"])
    ),
    "dilated": lambda h, i, j, layer, o, n_head: (
        ((i - j) % o["dilation"] == 0) & ((i - j) // o["dilation"] < o["window"])
    ),
    "longformer": _longformer,
    "sparse_strided": lambda h, i, j, layer, o, n_head: _sparse_transformer(
        i - j <= o["stride"], (i - j) % o["stride"] == 0, h, layer, o, n_head
    ),
    "sparse_fixed": lambda h, i, j, layer, o, n_head: _sparse_transformer(
        j // o["stride"] == i // o["stride"],
        j % o["stride"] >= o["stride"] - o["summary"],
        h,
        layer,
        o,
        n_head,
    ),
    "blockwise": _blockwise,
}


def _masked_softmax(mixer, q: Tensor, k: Tensor, v: Tensor, allowed: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(D) + ALiBi, where allowed) v, with j = i always allowed."""
    n = q.shape[-2]
    pos = torch.arange(n)
    allowed = allowed | torch.eye(n, dtype=torch.bool)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mixer.slopes is not None:
        scores = scores + alibi_bias(mixer.slopes, pos, pos).to(scores.dtype)
    causal = pos[None, :] <= pos[:, None]
    weights = scores.masked_fill(~(allowed & causal), float("-inf")).softmax(-1)
    return weights @ v


def pattern_reference(name: str):
    """The dense softmax of `name`'s spec predicate."""

    def reference(mixer, x: Tensor, layer: int, options) -> Tensor:
        q, k, v = mixer.project(x)
        n, n_head = x.shape[1], mixer.n_head
        h = torch.arange(n_head)[:, None, None]
        i, j = torch.arange(n)[None, :, None], torch.arange(n)[None, None, :]
        allowed = PREDICATES[name](h, i, j, layer, options, n_head)
        return mixer.merge_heads(_masked_softmax(mixer, q, k, v, allowed))

    return reference


def moba_reference(mixer, x: Tensor, layer: int, options) -> Tensor:
    """The gate as defined (q . mean key of each complete earlier block, the top_k highest, ties
    to the earlier block), then one softmax over the own block and the selected blocks."""
    q, k, v = mixer.project(x)
    b, top_k, n = options["block_size"], options["top_k"], x.shape[1]
    complete = n // b
    means = k.detach()[:, :, : complete * b].unflatten(2, (complete, b)).mean(3)
    scores = q.detach() @ means.transpose(-1, -2)  # [B, H, n, complete]
    block = torch.arange(n) // b
    scores = scores.masked_fill(torch.arange(complete)[None, :] >= block[:, None], float("-inf"))
    # A stable sort of the negated scores keeps equal scores in block order: ties go earlier.
    order = torch.sort(-scores, dim=-1, stable=True).indices[..., :top_k]
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, True)
    chosen &= scores > float("-inf")  # fewer candidates than top_k: all of them, no more
    selected = torch.zeros(*scores.shape[:-1], n, dtype=torch.bool)
    selected[..., : complete * b] = chosen.repeat_interleave(b, dim=-1)  # every key of the block
    own = block[None, :] == block[:, None]
    return mixer.merge_heads(_masked_softmax(mixer, q, k, v, own | selected))


def memory_compressed_layer_reference(mixer, x: Tensor, slot_visible=lambda end, i: end <= i):
    """A memory-compressed layer: slots built explicitly with F.conv1d, one softmax over
    [slots ; raw keys of the own block] with a dense mask."""
    k = mixer.compression
    batch, n, d_model = x.shape
    heads, head_dim = mixer.n_head, mixer.head_dim

    def split(t):
        return t.view(batch, -1, heads, head_dim).transpose(1, 2)

    q, keys, values = (split(t) for t in mixer.qkv(x).chunk(3, dim=-1))
    n_slots = n // k

    def compress(t, conv):
        if n_slots == 0:  # F.conv1d refuses an input shorter than its kernel
            return t[:, :, :0]
        channels_first = (
            t.transpose(1, 2).reshape(batch, n, d_model).transpose(1, 2)[:, :, : n_slots * k]
        )
        return split(F.conv1d(channels_first, conv.weight, conv.bias, stride=k).transpose(1, 2))

    slot_k, slot_v = compress(keys, mixer.compress_k), compress(values, mixer.compress_v)
    pos = torch.arange(n)
    slot_end = torch.arange(n_slots) * k + k - 1
    if mixer.rotary is not None:
        q, keys, slot_k = (
            mixer.rotary(q, pos),
            mixer.rotary(keys, pos),
            mixer.rotary(slot_k, slot_end),
        )
    i = pos[:, None]
    allowed = torch.cat(
        (slot_visible(slot_end[None, :], i), (pos[None, :] // k == i // k) & (pos[None, :] <= i)), 1
    )
    key_pos = torch.cat((slot_end, pos))
    scores = torch.cat((q @ slot_k.transpose(-1, -2), q @ keys.transpose(-1, -2)), -1) / math.sqrt(
        head_dim
    )
    if mixer.slopes is not None:
        scores = scores + alibi_bias(mixer.slopes, pos, key_pos).to(scores.dtype)
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    o = weights @ torch.cat((slot_v, values), 2)
    return mixer.out(o.transpose(1, 2).reshape(batch, n, d_model))


def memory_compressed_reference(mixer, x: Tensor, layer: int, options) -> Tensor:
    """alternate: even layers are local (blocks of block_size), the others memory-compressed."""
    if options["alternate"] and layer % 2 == 0:
        return pattern_reference("local")(mixer, x, layer, {**options, "look_back": 0})
    return memory_compressed_layer_reference(mixer, x)


def transformer_xl_layer_reference(mixer, x: Tensor) -> Tensor:
    """Every allowed pair (i, j) scored by the paper's formula, R_{i-j} written out per pair.

    Keys and values of earlier segments come from the stop-gradient input (the memory).
    """
    batch, n, d_model = x.shape
    heads, head_dim = mixer.n_head, mixer.head_dim
    seg, mem = mixer.segment_length, mixer.mem_len

    def split(t):
        return t.view(batch, n, heads, head_dim).transpose(1, 2)

    w_q, w_k, w_v = mixer.qkv.weight.chunk(3)
    q = split(x @ w_q.T)
    live_k, live_v = split(x @ w_k.T), split(x @ w_v.T)
    memory_k, memory_v = split(x.detach() @ w_k.T), split(x.detach() @ w_v.T)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    allowed = (j <= i) & (i - j <= mem + i % seg)
    from_memory = (j // seg < i // seg)[None, None, :, :, None]
    keys = torch.where(from_memory, memory_k[:, :, None], live_k[:, :, None])  # [B, H, i, j, Dh]
    values = torch.where(from_memory, memory_v[:, :, None], live_v[:, :, None])
    distance = (i - j).clamp(min=0).double()
    angles = distance[..., None] / 10000.0 ** (torch.arange(0, d_model, 2).double() / d_model)
    r = torch.cat((angles.sin(), angles.cos()), -1).to(x.dtype) @ mixer.position_proj.weight.T
    r = r.view(n, n, heads, head_dim)
    u, v = mixer.content_bias[:, 0], mixer.position_bias[:, 0]
    content = torch.einsum("bhid,bhijd->bhij", q + u[:, None], keys)
    position = torch.einsum("bhid,ijhd->bhij", q + v[:, None], r)
    scores = ((content + position) / math.sqrt(head_dim)).masked_fill(~allowed, float("-inf"))
    o = torch.einsum("bhij,bhijd->bhid", scores.softmax(-1), values)
    return mixer.out(o.transpose(1, 2).reshape(batch, n, d_model))


def recurrent_reference(mixer, x: Tensor, layer: int, options) -> Tensor:
    """The layer's recurrent form: one token at a time through `step`."""
    state, outputs = mixer.init_state(x.shape[0]), []
    for t in range(x.shape[1]):
        y, state = mixer.step(x[:, t : t + 1], state, t)
        outputs.append(y)
    return torch.cat(outputs, 1)


def hybrid_reference(mixer, x: Tensor, layer: int, options) -> Tensor:
    """The reference of the part that builds `layer`, with that part's options."""
    part = options["pattern"][layer % len(options["pattern"])]
    return REFERENCES[part](mixer, x, layer, dict(options["backends"].get(part) or {}))


REFERENCES = {
    **{name: pattern_reference(name) for name in PREDICATES},
    "moba": moba_reference,
    "memory_compressed": memory_compressed_reference,
    "transformer_xl": lambda mixer, x, layer, options: transformer_xl_layer_reference(mixer, x),
    "hybrid": hybrid_reference,
    **{
        name: recurrent_reference
        for name in ("linear", "rwkv", "aft_simple", "aft_local", "aft_conv", "aft_full")
    },
}
