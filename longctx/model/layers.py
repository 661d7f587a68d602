"""Feed-forward layers and norms of the decoder block."""

from __future__ import annotations

import math

from torch import Tensor, nn
from torch.nn import functional as F

from longctx.attention.base import StatelessMixer


class GeluMLP(StatelessMixer):
    """GPT-2 MLP: d -> hidden -> d with GELU."""

    def __init__(self, d_model: int, hidden: int, bias: bool, dropout: float):
        super().__init__()
        self.up = nn.Linear(d_model, hidden, bias=bias)
        self.down = nn.Linear(hidden, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.down(F.gelu(self.up(x), approximate="tanh")))

    def init_weights(self, n_layer: int) -> None:
        nn.init.normal_(self.down.weight, std=0.02 / math.sqrt(2 * n_layer))


class SwiGLU(StatelessMixer):
    """Llama MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, d_model: int, hidden: int, bias: bool, dropout: float):
        super().__init__()
        self.gate = nn.Linear(d_model, hidden, bias=bias)
        self.up = nn.Linear(d_model, hidden, bias=bias)
        self.down = nn.Linear(hidden, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.down(F.silu(self.gate(x)) * self.up(x)))

    def init_weights(self, n_layer: int) -> None:
        nn.init.normal_(self.down.weight, std=0.02 / math.sqrt(2 * n_layer))


MLPS = {"gelu": GeluMLP, "swiglu": SwiGLU}
NORMS = {"layernorm": nn.LayerNorm, "rmsnorm": nn.RMSNorm}
