"""RWKV-4 (Peng et al. 2023), `attention=rwkv`:
time mixing replaces attention, channel mixing the MLP.

Time mixing, per channel: token shift x'_t = mu * x_t + (1 - mu) * x_{t-1} (separate mu for the
key, value and receptance inputs; x_{-1} = 0), then

    out_t = W_o(sigmoid(r_t) * wkv_t),
    wkv_t = (sum_{i<t} e^{-(t-1-i) w + k_i} v_i + e^{u + k_t} v_t) / (same with v = 1),

with decay w = exp(time_decay) > 0 (the reference kernels' log-decay is -w) and bonus
u = time_first. The WKV operator lives in longctx/ops/wkv: the stable recurrence (reference.py,
also the streaming form for one token), the chunk-parallel torch kernel (chunk.py) and
flash-linear-attention's RWKV-4 Triton kernel (fla.py); `attention.kernel` picks `torch` or `fla`
per call (longctx/ops/seam.py), and all keep the same (a, b, p) state. Channel mixing:
sigmoid(W_r x'_r) * W_v(relu(W_k x'_k)^2), also token-shifted.

Streaming state per layer: the last input of each mixer (2 d) and the WKV state (a, b, p) (3 d),
i.e. 5 d numbers whatever the length. Order is implicit, so model.position is ignored.
Decays, bonus and shift mixes are initialised as in the RWKV-4 reference (ramps over channels
and layers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from longctx.attention.base import Backend, HeadMixer, Mixer, ModelSettings, State
from longctx.attention.registry import register
from longctx.errors import ConfigError
from longctx.ops.seam import FLA, TORCH, resolve_kernel
from longctx.ops.wkv.chunk import wkv_across_heads, wkv_flops
from longctx.ops.wkv.fla import fla_wkv
from longctx.ops.wkv.reference import WkvState, empty_wkv_state, wkv_recurrent

# ffn width of RWKV-4's channel mixing (dim_ffn = 4 * n_embd in the reference).
FFN_MULT = 4
# The kernels of the WKV operator, fastest on a GPU first.
KERNELS = (FLA, TORCH)


def _channel_ramp(d: int) -> Tensor:
    """i / d for channel i: the base of every RWKV-4 time_mix ramp."""
    return torch.arange(d, dtype=torch.float64) / d


def _shifted(x: Tensor, previous: Tensor | None) -> Tensor:
    """x_{t-1} for every t: `previous` (the last input of the preceding call) or zeros at t = 0."""
    first = torch.zeros_like(x[:, :1]) if previous is None else previous[:, None].to(x.dtype)
    return torch.cat((first, x[:, :-1]), 1)


class TimeMix(HeadMixer):
    def __init__(self, dims: ModelSettings, layer: int, kernel: str):
        super().__init__()
        d = dims.d_model
        self.kernel = kernel
        self.n_head, self.head_dim = dims.n_head, dims.head_dim
        deep = layer / (dims.n_layer - 1) if dims.n_layer > 1 else 0.0  # 0 -> 1 over the layers
        shallow = 1.0 - layer / dims.n_layer  # 1 -> ~0 over the layers
        channel = torch.arange(d, dtype=torch.float64) / max(d - 1, 1)
        ramp = _channel_ramp(d)
        # Reference init: decays from e^-5 (long memory) to e^3 (fast decay) across channels,
        # faster in deeper layers; the bonus zigzags around log(0.3).
        self.time_decay = nn.Parameter((-5 + 8 * channel ** (0.7 + 1.3 * deep)).float())
        zigzag = torch.tensor([((i + 1) % 3) - 1 for i in range(d)], dtype=torch.float64) * 0.5
        self.time_first = nn.Parameter((math.log(0.3) + zigzag).float())
        self.time_mix_k = nn.Parameter((ramp**shallow).float())
        self.time_mix_v = nn.Parameter((ramp**shallow + 0.3 * deep).float())
        self.time_mix_r = nn.Parameter((ramp ** (0.5 * shallow)).float())
        self.key = nn.Linear(d, d, bias=False)
        self.value = nn.Linear(d, d, bias=False)
        self.receptance = nn.Linear(d, d, bias=False)
        self.out = nn.Linear(d, d, bias=False)

    def _heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.n_head, self.head_dim).transpose(1, 2)

    def _project(self, x: Tensor, previous: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        xx = _shifted(x, previous)
        mix = lambda mu: x * mu + xx * (1 - mu)  # noqa: E731 - the token-shift interpolation
        r = self.receptance(mix(self.time_mix_r))
        k = self.key(mix(self.time_mix_k))
        v = self.value(mix(self.time_mix_v))
        return self._heads(r), self._heads(k), self._heads(v)

    def project(self, x: Tensor, start: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """r, k, v [B, H, n, Dh] for a fresh sequence (the token shift starts from zeros)."""
        return self._project(x, None)

    def decay_and_bonus(self) -> tuple[Tensor, Tensor]:
        """w = exp(time_decay) and u = time_first, shaped [H, Dh] to broadcast over [B, H, Dh]."""
        shape = (self.n_head, self.head_dim)
        return torch.exp(self.time_decay).view(shape), self.time_first.view(shape)

    def _wkv(self, k: Tensor, v: Tensor, state: WkvState | None) -> tuple[Tensor, WkvState]:
        """WKV of k, v [B, H, n, Dh] from `state` (None: a fresh sequence), seam-chosen kernel."""
        if resolve_kernel(self.kernel, KERNELS, k.device) == FLA:
            shape = (self.n_head, self.head_dim)
            return fla_wkv(k, v, self.time_decay.view(shape), self.time_first.view(shape), state)
        if state is None:
            state = empty_wkv_state(k.shape[:-2] + k.shape[-1:], k)
        w, u = self.decay_and_bonus()
        return wkv_across_heads(k, v, w, u, state)

    def mix(self, r: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return torch.sigmoid(r) * self._wkv(k, v, None)[0]

    def init_state(self, batch_size: int) -> State:
        like = self.out.weight
        last_x = like.new_zeros(batch_size, like.shape[0])
        return last_x, empty_wkv_state((batch_size, self.n_head, self.head_dim), like)

    def step(self, x: Tensor, state: State, start: int) -> tuple[Tensor, State]:
        last_x, wkv_state = state
        r, k, v = self._project(x, last_x)
        if x.shape[1] == 1:
            wkv, wkv_state = wkv_recurrent(k, v, *self.decay_and_bonus(), wkv_state)
        else:
            wkv, wkv_state = self._wkv(k, v, wkv_state)
        return self.merge_heads(torch.sigmoid(r) * wkv), (x[:, -1], wkv_state)


class ChannelMix(Mixer):
    """RWKV-4's MLP: sigmoid(W_r x'_r) * W_v(relu(W_k x'_k)^2) on token-shifted inputs."""

    def __init__(self, dims: ModelSettings, layer: int):
        super().__init__()
        d = dims.d_model
        shallow = 1.0 - layer / dims.n_layer
        ramp = _channel_ramp(d)
        self.time_mix_k = nn.Parameter((ramp**shallow).float())
        self.time_mix_r = nn.Parameter((ramp**shallow).float())
        self.key = nn.Linear(d, FFN_MULT * d, bias=False)
        self.receptance = nn.Linear(d, d, bias=False)
        self.value = nn.Linear(FFN_MULT * d, d, bias=False)

    def init_weights(self, n_layer: int) -> None:
        nn.init.normal_(self.value.weight, std=0.02 / math.sqrt(2 * n_layer))

    def _mix(self, x: Tensor, previous: Tensor | None) -> Tensor:
        xx = _shifted(x, previous)
        xk = x * self.time_mix_k + xx * (1 - self.time_mix_k)
        xr = x * self.time_mix_r + xx * (1 - self.time_mix_r)
        return torch.sigmoid(self.receptance(xr)) * self.value(torch.relu(self.key(xk)).square())

    def forward(self, x: Tensor) -> Tensor:
        return self._mix(x, None)

    def init_state(self, batch_size: int) -> State:
        like = self.value.weight
        return like.new_zeros(batch_size, like.shape[0])

    def step(self, x: Tensor, state: State, start: int) -> tuple[Tensor, State]:
        return self._mix(x, state), x[:, -1]


@register
class RWKV(Backend):
    name = "rwkv"
    kernels = KERNELS

    @dataclass(frozen=True)
    class Options:
        version: int = 4

    def validate(self) -> None:
        if self.options.version != 4:
            raise ConfigError(
                f"attention.version={self.options.version} is not implemented; only RWKV-4 exists "
                "here, set attention.version=4"
            )

    def mixer(self, layer: int) -> Mixer:
        return TimeMix(self.dims, layer, self.kernel)

    def ffn(self, layer: int) -> Mixer | None:
        return ChannelMix(self.dims, layer)

    def attention_flops(self, seq_len: int) -> float:
        return wkv_flops(seq_len, self.dims.d_model)
