"""Positional schemes for softmax attention: rotary (RoPE) and ALiBi slopes.

`learned` absolute embeddings live in the language model (they act on the input, not on q/k);
`none` uses nothing. Recurrent backends ignore the scheme: order is implicit in the recurrence.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

POSITION_SCHEMES = ("rope", "alibi", "learned", "none")


class Rotary(nn.Module):
    """RoPE (Su et al. 2021) applied at explicit absolute positions, so streaming can resume."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """x: [B, H, n, Dh]; positions: [n] absolute indices."""
        angles = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        cos, sin = angles.cos(), angles.sin()
        x1, x2 = x.float().chunk(2, dim=-1)
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return rotated.to(x.dtype)


def alibi_slopes(n_head: int) -> Tensor:
    """Head slopes of Press et al. 2022: a geometric sequence, interleaved for non-powers of 2."""

    def power_of_two_slopes(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_head).is_integer():
        slopes = power_of_two_slopes(n_head)
    else:
        closest = 2 ** math.floor(math.log2(n_head))
        slopes = (
            power_of_two_slopes(closest)
            + power_of_two_slopes(2 * closest)[0::2][: n_head - closest]
        )
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
    """Additive score bias [H, nq, nk] = -slope_h * (i - j)."""
    distance = (q_pos[:, None] - k_pos[None, :]).to(slopes.dtype)
    return -slopes[:, None, None] * distance
