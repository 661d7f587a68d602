"""Third-party implementations timed next to ours when they are installed (never required).

Each anchor makes random inputs of the bench's shapes and returns a function of them whose
output is one tensor, so the bench times it exactly like a backend's `mix`. The
`pip install longctx[anchors]` extra brings two of them; flash-linear-attention is `fla-core`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor, nn

from longctx.errors import ConfigError

WINDOW = 512  # the anchor figures' window (README table); the sliding-window backends' default


@dataclass(frozen=True)
class AnchorSpec:
    label: str
    module: str  # what must be importable (checked without importing it)
    pip: str
    preload: str  # the (slow) import the worker processes share, done once in their forkserver


ANCHORS: dict[str, AnchorSpec] = {
    "local_attention": AnchorSpec(
        "lucidrains local-attention (window 512, look_backward 1: block-local, 512-1024 keys)",
        "local_attention",
        "local-attention",
        "local_attention",
    ),
    "longformer_hf": AnchorSpec(
        "HF LongformerSelfAttention (window 512, BIDIRECTIONAL, incl. q/k/v projections)",
        "transformers",
        "transformers",
        "transformers.models.longformer.modeling_longformer",
    ),
    "fla_naive_linear": AnchorSpec(
        "flash-linear-attention naive_chunk_linear_attn (pure torch, C=64, no feature map)",
        "fla",
        "fla-core",
        "einops",  # fla itself is loaded file by file (see _fla_naive_module)
    ),
}


def missing_anchors(names: list[str]) -> dict[str, str]:
    """For each requested anchor that cannot be imported here: why (a note for the outputs).

    Unknown names are not this function's business: the settings reject them with the valid ones.
    """
    return {
        name: f"{ANCHORS[name].module} is not installed (pip install {ANCHORS[name].pip})"
        for name in names
        if name in ANCHORS and importlib.util.find_spec(ANCHORS[name].module) is None
    }


Inputs = tuple[Tensor, ...]


def build(
    name: str, batch: int, heads: int, head_dim: int, seq_len: int, dtype, device
) -> tuple[Callable[..., Tensor], Inputs, nn.Module | None]:
    """(function, inputs, module holding its parameters or None) for anchor `name`."""
    return _BUILDERS[name](batch, heads, head_dim, seq_len, dtype, device)


def _qkv(shape, dtype, device) -> Inputs:
    return tuple(torch.randn(shape, dtype=dtype, device=device) for _ in range(3))


def _local_attention(batch, heads, head_dim, seq_len, dtype, device):
    from local_attention import LocalAttention

    # Our `mix` receives already-rotated q/k, so the anchor's own rotary embedding is turned off.
    attention = LocalAttention(
        window_size=WINDOW,
        causal=True,
        look_backward=1,
        look_forward=0,
        autopad=True,
        use_rotary_pos_emb=False,
    ).to(device)
    return attention, _qkv((batch, heads, seq_len, head_dim), dtype, device), None


def _longformer_hf(batch, heads, head_dim, seq_len, dtype, device):
    from transformers import LongformerConfig
    from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

    d_model = heads * head_dim
    config = LongformerConfig(
        hidden_size=d_model,
        num_attention_heads=heads,
        attention_window=[WINDOW],
        attention_probs_dropout_prob=0.0,
    )
    if seq_len % WINDOW:  # LongformerModel pads; the layer alone asserts
        raise ConfigError(
            f"LongformerSelfAttention needs a length divisible by {WINDOW}, got {seq_len}"
        )
    layer = LongformerSelfAttention(config, layer_id=0).to(device=device, dtype=dtype)
    local_only = torch.zeros(batch, seq_len, device=device)  # 0 = local attention, no global tokens
    no_index = torch.zeros(batch, seq_len, dtype=torch.bool, device=device)

    def attend(hidden: Tensor) -> Tensor:
        return layer(
            hidden,
            attention_mask=local_only,
            is_index_masked=no_index,
            is_index_global_attn=no_index,
            is_global_attn=False,
        )[0]

    hidden = torch.randn(batch, seq_len, d_model, dtype=dtype, device=device)
    return attend, (hidden,), layer


def _fla_naive_module() -> ModuleType:
    """fla's pure-torch reference; without triton `import fla.ops` fails, so load the file alone."""
    try:
        from fla.ops.linear_attn import naive

        return naive
    except ImportError:
        package = Path(importlib.util.find_spec("fla").origin).parent
        spec = importlib.util.spec_from_file_location(
            "fla_linear_attn_naive", package / "ops" / "linear_attn" / "naive.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # imports only torch and einops
        return module


def _fla_naive_linear(batch, heads, head_dim, seq_len, dtype, device):
    naive = _fla_naive_module()
    # fla's layout is [B, T, H, D]; its chunk is 64 and T must be a multiple of it.
    if seq_len % 64:
        raise ConfigError(f"naive_chunk_linear_attn needs a length divisible by 64, got {seq_len}")
    return (
        naive.naive_chunk_linear_attn,
        _qkv((batch, seq_len, heads, head_dim), dtype, device),
        None,
    )


_BUILDERS = {
    "local_attention": _local_attention,
    "longformer_hf": _longformer_hf,
    "fla_naive_linear": _fla_naive_linear,
}
