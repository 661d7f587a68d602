"""The training precision a trainer preset uses when the user names none: bf16 autocast where
the hardware multiplies bf16 natively, fp32 elsewhere.

bf16 autocast roughly halves the time of a step on CUDA GPUs with bf16 and on CPUs with
AVX-512-BF16 or AMX; on other CPUs every bf16 matmul is emulated and a step takes many times
longer than in fp32 (docs/results/bench_cpu/LOG.md,
"bf16 autocast on a CPU without bf16 units").
"""

from __future__ import annotations

import torch

BF16_MIXED = "bf16-mixed"
FP32 = "32-true"


def cpu_multiplies_bf16() -> bool:
    """Whether oneDNN has native bf16 kernels on this CPU (AVX-512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False


def default_training_precision(accelerator: str = "auto") -> str:
    """Lightning's `precision` for `accelerator` (auto, cpu, gpu, cuda) on this machine."""
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return BF16_MIXED if torch.cuda.is_bf16_supported() else FP32
    return BF16_MIXED if cpu_multiplies_bf16() else FP32
