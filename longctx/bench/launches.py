"""`mode=launches`: what one block's training step dispatches, per kernel choice. A count, no clock.

A one-block model of `model_size` at the configuration's batch and N runs forward, the loss and
backward (the optimizer's ops do not depend on the attention), under
longctx.ops.launches.LaunchCounter: aten ops dispatched, Triton kernels launched (fla), and
FlexAttention counted as the kernels it launches on a GPU. `kernel_launches` is their sum: on a
GPU each is at least one kernel launch, so it tells a launch-bound kernel without a GPU. A first
forward at batch 1 fills the per-length caches (BlockMasks, engine layouts) beforehand, as the
first step of a run does; `host_syncs` then counts what every step waits for.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from longctx.bench.config import DTYPES, Config
from longctx.bench.workloads import VOCAB, model_config
from longctx.model.build import build_model
from longctx.ops.launches import LaunchCounter


def count_block_step(config: Config) -> dict[str, Any]:
    """kernel_launches, aten_ops, triton_launches, opaque_launches and host_syncs of one step."""
    model = build_model(model_config(config, n_layer=1), VOCAB).to(config.device)
    model.backend.check_sequence_length(config.seq_len)
    dtype = DTYPES[config.dtype]
    autocast = dtype in (torch.bfloat16, torch.float16)
    if not autocast:
        model.to(dtype)
    device = torch.device(config.device)

    def ids(batch: int) -> torch.Tensor:
        return torch.randint(0, VOCAB, (batch, config.seq_len + 1), device=device)

    def forward(tokens: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            logits = model(tokens[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())

    with torch.no_grad():
        forward(ids(1))
    tokens = ids(config.batch)
    with LaunchCounter() as counter:
        forward(tokens).backward()
    return {
        "kernel_launches": counter.kernel_launches,
        "aten_ops": counter.aten_ops,
        "triton_launches": counter.triton_launches,
        "opaque_launches": counter.opaque_launches,
        "host_syncs": counter.host_syncs,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
