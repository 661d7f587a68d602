"""Streaming state size: the bytes a model holds per sequence to continue decoding.

Measured, not derived from a formula: one sequence is decoded token by token through the
model's own `init_state` and `step`, and after every token each tensor of the state is counted
(numel * element size; every layer's mixer and feed-forward state and the position counter).
`bytes` is the state after n tokens, `peak_bytes` the largest after any of tokens 1..n: a growing
K/V cache peaks at n, a window stays at its size, and a state that empties at block or segment
boundaries (local attention's current block, Transformer-XL's current segment) peaks just
before one, which the state after exactly n tokens can miss.
"""

from __future__ import annotations

import torch

from longctx.core.state import map_state


def state_bytes(state) -> tuple[int, int]:
    """(tensors, bytes) of every tensor in a nested tuple/list/dict state."""
    sizes: list[int] = []
    map_state(lambda t: sizes.append(t.numel() * t.element_size()), state)
    return len(sizes), sum(sizes)


@torch.no_grad()
def streaming_state_size(model, length: int, vocab_size: int, seed: int = 0) -> dict:
    """The state of one sequence decoded for `length` tokens: {length, tensors, bytes,
    peak_bytes}."""
    if length < 1:
        raise ValueError(f"state size needs a length of at least 1 token, got {length}")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (1, length), generator=generator).to(device)
    state, peak = model.init_state(1), 0
    for position in range(length):
        _, state = model.step(ids[:, position : position + 1], state)
        tensors, nbytes = state_bytes(state)
        peak = max(peak, nbytes)
    return {"length": length, "tensors": tensors, "bytes": nbytes, "peak_bytes": peak}
