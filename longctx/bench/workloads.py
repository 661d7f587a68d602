"""The work being timed: one callable per configuration, built on the backend contract.

A backend is built from its config defaults (plus any `options` override) for a one-layer model
with no positional scheme, so every backend sees the same shapes (B, H, N, Dh) as SDPA.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch.nn import functional as F

from longctx.attention import Backend, ModelSettings, build_backend
from longctx.bench import anchors
from longctx.bench.config import DTYPES, Config
from longctx.bench.measure import MIB, state_size, synchronize
from longctx.flops import matmul_parameters, training_flops_per_token
from longctx.model.build import build_model
from longctx.ops.seam import AUTO

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
VOCAB = 256  # the byte tokenizer's vocabulary, for train_step


@dataclass
class Workload:
    call: Callable[[], Any]  # one timed unit: a kernel call, a training step, or one decoded token
    tokens_per_call: int
    flops_per_call: float | None = None  # model FLOPs of one call (None: not counted)
    info: dict[str, Any] = field(
        default_factory=dict
    )  # extra row fields (state size, prefill time)


def dims_for(config: Config) -> ModelSettings:
    return ModelSettings(
        n_layer=1,
        n_head=config.heads,
        d_model=config.heads * config.head_dim,
        context_length=config.seq_len,
        position="none",
    )


def _kernel_choice(config: Config) -> dict[str, str]:
    """attention.kernel when one is named (auto is every backend's default; aft_conv's `kernel`
    option is its kernel length and stays whatever the options say)."""
    return {} if config.kernel == AUTO else {"kernel": config.kernel}


def build_bench_backend(config: Config) -> Backend:
    """The backend at its config defaults; raises ConfigError (e.g. N > max_len) before any work."""
    backend = build_backend(
        {"name": config.subject, **config.options, **_kernel_choice(config)}, dims_for(config)
    )
    backend.check_sequence_length(
        config.seq_len + (config.decode_tokens if config.mode == "decode" else 0)
    )
    return backend


def _flops(counter: Callable[[], float]) -> float | None:
    try:
        return counter()
    except NotImplementedError:  # the backend does not count its FLOPs
        return None


def _kernel(
    fn: Callable[..., Tensor], inputs: tuple, params: list[nn.Parameter], mode: str
) -> Callable[[], None]:
    """fwd: no autograd. fwd_bwd: out.sum().backward(), gradients freed before each call."""
    if mode == "fwd":

        def forward() -> None:
            with torch.no_grad():
                fn(*inputs)

        return forward

    inputs = tuple(t.detach().requires_grad_() if t.is_floating_point() else t for t in inputs)
    leaves = [t for t in inputs if t.requires_grad] + params

    def forward_backward() -> None:
        for leaf in leaves:
            leaf.grad = None  # a fresh gradient each call: no accumulation, honest memory
        fn(*inputs).sum().backward()

    return forward_backward


def _kernel_flops(forward_flops: float | None, mode: str) -> float | None:
    if forward_flops is None:
        return None
    return forward_flops * (3 if mode == "fwd_bwd" else 1)  # backward costs twice the forward


def _sdpa_forward_flops(config: Config) -> float:
    # SDPA computes the causal attention `full` counts; reuse its formula rather than copy it.
    full = build_backend({"name": "full"}, dims_for(config))
    return config.batch * full.attention_flops(config.seq_len)


def _random(config: Config, *shape: int) -> Tensor:
    return torch.randn(*shape, dtype=DTYPES[config.dtype], device=config.device)


def _sdpa_kernel(config: Config) -> Workload:
    shape = (config.batch, config.heads, config.seq_len, config.head_dim)
    inputs = tuple(_random(config, *shape) for _ in range(3))

    def sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return Workload(
        _kernel(sdpa, inputs, [], config.mode),
        config.batch * config.seq_len,
        _kernel_flops(_sdpa_forward_flops(config), config.mode),
    )


def _mixer(config: Config, backend: Backend) -> nn.Module:
    """Layer 0's mixer, initialised as LanguageModel does it (values can change the speed of a
    kernel: overflowing or denormal exponentials), in the bench's dtype."""
    mixer = backend.mixer(0)
    for module in mixer.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    mixer.init_weights(1)
    return mixer.to(device=config.device, dtype=DTYPES[config.dtype])


def _backend_kernel(config: Config) -> Workload:
    backend = build_bench_backend(config)
    mixer = _mixer(config, backend)
    x = _random(config, config.batch, config.seq_len, config.heads * config.head_dim)
    # The projections in the layout SDPA and the anchors get: contiguous [B, H, N, Dh]. The
    # views the fused projection returns would charge each backend a copy its rivals skip.
    with torch.no_grad():
        inputs = tuple(t.detach().contiguous() for t in mixer.project(x))
    params = [p for p in mixer.parameters() if p.requires_grad]
    flops = _flops(lambda: config.batch * backend.attention_flops(config.seq_len))
    return Workload(
        _kernel(mixer.mix, inputs, params, config.mode),
        config.batch * config.seq_len,
        _kernel_flops(flops, config.mode),
    )


def _backend_layer(config: Config) -> Workload:
    """The whole mixer (projections included), forward + backward."""
    backend = build_bench_backend(config)
    mixer = _mixer(config, backend)
    x = _random(config, config.batch, config.seq_len, config.heads * config.head_dim)
    params = [p for p in mixer.parameters() if p.requires_grad]
    tokens = config.batch * config.seq_len
    flops = _flops(
        lambda: (
            3
            * (
                config.batch * backend.attention_flops(config.seq_len)
                + 2 * tokens * matmul_parameters(mixer)
            )
        )
    )
    return Workload(_kernel(mixer, (x,), params, "fwd_bwd"), tokens, flops)


def _anchor_kernel(config: Config) -> Workload:
    fn, inputs, module = anchors.build(
        config.subject,
        config.batch,
        config.heads,
        config.head_dim,
        config.seq_len,
        DTYPES[config.dtype],
        torch.device(config.device),
    )
    params = [p for p in module.parameters() if p.requires_grad] if module is not None else []
    return Workload(_kernel(fn, inputs, params, config.mode), config.batch * config.seq_len)


class _Decoder:
    """Feeds one random token per call through `step`, carrying the state forward."""

    def __init__(
        self,
        step: Callable[[Tensor, Any, int], tuple[Tensor, Any]],
        state: Any,
        start: int,
        x: Tensor,
    ):
        self.step, self.state, self.position, self.x = step, state, start, x

    @torch.no_grad()
    def __call__(self) -> None:
        token = self.x[:, self.position % self.x.shape[1]].unsqueeze(1)
        _, self.state = self.step(token, self.state, self.position)
        self.position += 1


def _decode(config: Config, step, state, x: Tensor) -> Workload:
    """Prefill x's N tokens in chunks of prefill_chunk, then time single-token steps."""
    start_s = time.perf_counter()  # the prefill is timed once: context for the per-token figure
    with torch.no_grad():
        for start in range(0, config.seq_len, config.prefill_chunk):
            _, state = step(x[:, start : start + config.prefill_chunk], state, start)
    synchronize(x.device)
    prefill_s = time.perf_counter() - start_s
    elements, nbytes = state_size(state)
    info = {"state_elements": elements, "state_mib": nbytes / MIB, "prefill_ms": prefill_s * 1e3}
    return Workload(_Decoder(step, state, config.seq_len, x), config.batch, None, info)


def _sdpa_decode(config: Config) -> Workload:
    """Baseline decode: a growing K/V cache and SDPA of the new queries over it."""
    # x[:, t] stands for the projected q = k = v of position t: only the cost matters.
    x = _random(config, config.batch, config.seq_len, config.heads, config.head_dim)

    def step(tokens: Tensor, cache: tuple[Tensor, Tensor], start: int):
        qkv = tokens.transpose(1, 2)  # [B, H, n, Dh]
        keys, values = torch.cat((cache[0], qkv), dim=2), torch.cat((cache[1], qkv), dim=2)
        n, total = qkv.shape[2], keys.shape[2]
        # Query t of the chunk sits at position start + t = total - n + t and sees keys 0..that.
        allowed = (
            None
            if n == 1
            else torch.ones(n, total, dtype=torch.bool, device=x.device).tril(total - n)
        )
        return F.scaled_dot_product_attention(qkv, keys, values, attn_mask=allowed), (keys, values)

    empty = x.new_zeros(config.batch, config.heads, 0, config.head_dim)
    return _decode(config, step, (empty, empty), x)


def _backend_decode(config: Config) -> Workload:
    backend = build_bench_backend(config)
    mixer = _mixer(config, backend).eval()
    x = _random(config, config.batch, config.seq_len, config.heads * config.head_dim)
    return _decode(config, mixer.step, mixer.init_state(config.batch), x)


def model_config(config: Config, n_layer: int | None = None) -> dict[str, Any]:
    """The root config of a model_size model with the configuration's attention and length."""
    attention = OmegaConf.load(CONF_DIR / "attention" / f"{config.subject}.yaml")
    model = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / f"{config.model_size}.yaml"))
    return {
        "model": {**model, **({} if n_layer is None else {"n_layer": n_layer})},
        "attention": {
            **OmegaConf.to_container(attention),
            **config.options,
            **_kernel_choice(config),
        },
        "context_length": config.seq_len,
    }


def _train_step(config: Config) -> Workload:
    """A whole model's AdamW step (model_size from conf/model),
    bf16 as autocast like the trainer."""
    model = build_model(model_config(config), VOCAB).to(config.device)
    model.backend.check_sequence_length(config.seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, VOCAB, (config.batch, config.seq_len + 1), device=config.device)
    dtype = DTYPES[config.dtype]
    autocast = dtype in (torch.bfloat16, torch.float16)
    if not autocast:
        model.to(dtype)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(torch.device(config.device).type, dtype=dtype, enabled=autocast):
            logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()

    tokens = config.batch * config.seq_len
    flops = _flops(lambda: tokens * training_flops_per_token(model, config.seq_len))
    return Workload(
        train_step, tokens, flops, {"parameters": sum(p.numel() for p in model.parameters())}
    )


def build_workload(config: Config) -> Workload:
    if config.mode == "train_step":
        return _train_step(config)
    if config.mode == "layer":
        return _backend_layer(config)
    if config.mode == "decode":
        return _sdpa_decode(config) if config.kind == "baseline" else _backend_decode(config)
    builders = {"baseline": _sdpa_kernel, "backend": _backend_kernel, "anchor": _anchor_kernel}
    return builders[config.kind](config)
