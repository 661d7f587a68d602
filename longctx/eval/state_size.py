"""Streaming state size: the bytes a model holds per sequence to continue decoding after n tokens.

Measured, not derived from a formula: a batch of one sequence runs through the model's own
`init_state` and `step` (a prefill of n - 1 tokens, then one decoding step), and every tensor of
the resulting state is counted (numel * element size). Growing states (a K/V cache) are thereby
sized at the length evaluated, bounded ones (a window, a block) at what they really keep, and
constant ones (linear attention, RWKV) at their fixed size. The state includes every layer's
mixer and feed-forward state and the position counter.
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
    """The state after `length` tokens of one sequence: {length, tensors, bytes}."""
    if length < 2:
        raise ValueError(f"state size needs a length of at least 2 tokens, got {length}")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (1, length), generator=generator).to(device)
    state = model.init_state(1)
    _, state = model.step(ids[:, :-1], state)
    _, state = model.step(ids[:, -1:], state)
    tensors, nbytes = state_bytes(state)
    return {"length": length, "tensors": tensors, "bytes": nbytes}
