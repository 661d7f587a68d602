"""Model FLOPs for MFU: what one training token costs and what the hardware can do.

Per-token training FLOPs follow Kaplan et al. / PaLM: every weight of a linear layer does one
multiply-add (2 FLOPs) per token forward and twice that backward, hence 6 x those weights; the
sequence mixing adds its own forward work, counted by each backend's `attention_flops(N)`
(the work it really does, e.g. a window instead of the dense N^2), times 3 for forward + backward.
"""

from __future__ import annotations

import functools
import time

import torch
from torch import nn

from longctx.model.lm import LanguageModel

# Dense (no sparsity) tensor-core peaks in FLOP/s from the vendors' datasheets, matched against
# torch.cuda.get_device_name. fp32 means plain FP32 (TF32 is reported only if TF32 is enabled).
GPU_PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12},
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12},  # SXM / HBM3
    "A100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
}

DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def matmul_parameters(model: nn.Module) -> int:
    """Weights that multiply every token once: the parameters of the model's linear layers.

    Embedding tables are lookups, not matmuls; a head tied to the token embedding is a Linear
    and counts. Norm gains and mixer-owned tensors (position tables, decays, conv kernels) are
    not per-token matmul weights: a mixer's own work belongs in its backend's attention_flops.
    """
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            for param in module.parameters(recurse=False):
                if id(param) not in seen:
                    seen.add(id(param))
                    total += param.numel()
    return total


def training_flops_per_token(model: LanguageModel, seq_len: int) -> float:
    """Forward + backward FLOPs per token of training on sequences of `seq_len` tokens."""
    mixing_per_sequence = model.dims.n_layer * model.backend.attention_flops(seq_len)
    return 6.0 * matmul_parameters(model) + 3.0 * mixing_per_sequence / seq_len


@functools.cache
def measured_matmul_flops(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of a size^3 matmul on this CPU (the CPU's usable peak; cached per process)."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up: thread pool and kernel selection
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def peak_flops(device: torch.device | str, dtype: torch.dtype) -> float | None:
    """Peak FLOP/s of `device` for matmuls in `dtype`, or None when unknown.

    GPUs: the datasheet table above (None for an unlisted GPU). CPUs have no reliable datasheet
    figure (cores, clocks and AMX/AVX-512 vary), so the CPU peak is a measured matmul.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return measured_matmul_flops(dtype)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    key = DTYPE_NAMES.get(dtype)
    if key == "fp32" and torch.backends.cuda.matmul.allow_tf32:
        key = "tf32"
    for gpu, peaks in GPU_PEAK_FLOPS.items():  # ordered so "H100 PCIe" matches before "H100"
        if gpu in name and key in peaks:
            return peaks[key]
    return None


def mfu(tokens_per_second: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak
    (None when the peak is unknown)."""
    if not peak:
        return None
    return tokens_per_second * flops_per_token / peak
