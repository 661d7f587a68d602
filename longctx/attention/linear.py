"""Causal linear attention (Katharopoulos et al. 2020), `attention=linear`.

o_i = phi(q_i)^T S_i / (phi(q_i)^T z_i + eps),
S_i = sum_{j<=i} phi(k_j) v_j^T, z_i = sum_{j<=i} phi(k_j).

The kernels live in longctx/ops/linear: the per-token recurrence (reference.py, also the
streaming form for one token), the chunk-parallel torch kernel (chunk.py) and
flash-linear-attention's chunked Triton kernel (fla.py). `attention.kernel` picks `torch` or `fla`
per call (longctx/ops/seam.py); every form keeps the same (S | z) state, so the streaming state
is one [B, H, Dk, Dv + 1] tensor whichever kernel ran.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from longctx.attention.base import Backend, HeadMixer, Mixer, ModelSettings, State, split_qkv
from longctx.attention.registry import register
from longctx.core.dtypes import accumulation_dtype
from longctx.errors import ConfigError
from longctx.ops.head_parallel import across_heads
from longctx.ops.linear.chunk import chunked_linear_attention
from longctx.ops.linear.fla import fla_linear_attention
from longctx.ops.linear.reference import FEATURE_MAPS, recurrent_linear_attention
from longctx.ops.seam import FLA, TORCH, resolve_kernel

# The kernels of this backend, fastest on a GPU first.
KERNELS = (FLA, TORCH)


class LinearAttention(HeadMixer):
    def __init__(self, dims: ModelSettings, feature_map: str, chunk_size: int, kernel: str):
        super().__init__()
        self.n_head = dims.n_head
        self.head_dim = dims.head_dim
        self.feature = feature_map
        self.chunk_size = chunk_size
        self.kernel = kernel
        self.qkv = nn.Linear(dims.d_model, 3 * dims.d_model, bias=dims.bias)
        self.out = nn.Linear(dims.d_model, dims.d_model, bias=dims.bias)

    def project(self, x: Tensor, start: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v [B, H, n, Dh]; linear attention has no positional scheme
        (order is causal sums)."""
        return split_qkv(self.qkv(x), self.n_head)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, state: Tensor | None):
        """(out, state after) from `state` (None: a fresh sequence) with the chosen kernel."""
        if resolve_kernel(self.kernel, KERNELS, q.device) == FLA:
            return fla_linear_attention(q, k, v, state, self.feature)
        if state is None:
            state = q.new_zeros(*q.shape[:-2], self.head_dim, self.head_dim + 1)
        return across_heads(
            chunked_linear_attention,
            (q, k, v, state, self.chunk_size, self.feature),
            (1, 1, 1, 1, None, None),
        )

    def mix(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return self._attend(q, k, v, None)[0]

    def init_state(self, batch_size: int) -> State:
        weight = self.out.weight
        dtype = accumulation_dtype(weight.dtype)
        return weight.new_zeros(
            batch_size, self.n_head, self.head_dim, self.head_dim + 1, dtype=dtype
        )

    def step(self, x: Tensor, state: State, start: int) -> tuple[Tensor, State]:
        q, k, v = self.project(x, start)
        if x.shape[1] == 1:
            o, state = recurrent_linear_attention(q, k, v, state, self.feature)
        else:
            o, state = self._attend(q, k, v, state)
        return self.merge_heads(o), state


@register
class LinearBackend(Backend):
    name = "linear"
    kernels = KERNELS

    @dataclass(frozen=True)
    class Options:
        feature_map: str = "elu"
        chunk_size: int = 64

    def validate(self) -> None:
        if self.options.feature_map not in FEATURE_MAPS:
            raise ConfigError(
                f"attention.feature_map={self.options.feature_map!r} is not valid; "
                f"choose one of {sorted(FEATURE_MAPS)}"
            )
        if self.options.chunk_size < 1:
            raise ConfigError(f"attention.chunk_size must be >= 1, got {self.options.chunk_size}")

    def mixer(self, layer: int) -> Mixer:
        options = self.options
        return LinearAttention(self.dims, options.feature_map, options.chunk_size, self.kernel)

    def attention_flops(self, seq_len: int) -> float:
        c = self.options.chunk_size
        padded = -(-seq_len // c) * c
        dk = self.dims.head_dim
        e = dk + 1
        # Per head: K_c^T V'_c and Q_c S_prev (2 x 2 dk e per position), the full C x C
        # intra-chunk square Q_c K_c^T (2 C dk) and its product with V'_c (2 C e).
        per_head = padded * (4 * dk * e + 2 * c * dk + 2 * c * e)
        return float(self.dims.n_head * per_head)
