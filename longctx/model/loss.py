"""Next-token cross-entropy over sequence chunks: never all [B*N, V] logits in fp32 at once.

The plain loss computes the head's logits for every position, casts them to fp32 and keeps
them (and their fp32 copy) for the backward pass: at long context with a large vocabulary that
is the biggest tensor of a step. Here the positions are cut into chunks; each chunk's logits are
computed, reduced to a summed loss and dropped, and recomputed chunk by chunk in the backward
pass (non-reentrant activation checkpointing of the head and the loss). Only the final hidden
states are kept, and one chunk's logits exist at a time.

The result is the plain mean loss, summed in another order: equal up to fp32 rounding of the
sum (exact in fp64), with the same per-logit gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from longctx.core.dtypes import accumulation_dtype

# Logits per chunk: 2**25 fp32 values are 128 MiB, small next to a long-context step's
# activations while keeping each chunk's matmul large. Rows per chunk = this / vocabulary size.
LOGITS_PER_CHUNK = 2**25


IGNORE_INDEX = -100  # a target that is not scored (F.cross_entropy's default ignore_index)


def _summed_loss(head: nn.Module, hidden: Tensor, targets: Tensor) -> Tensor:
    logits = head(hidden)
    return F.cross_entropy(logits.to(accumulation_dtype(logits.dtype)), targets, reduction="sum")


def _correct(head: nn.Module, hidden: Tensor, targets: Tensor) -> Tensor:
    with torch.no_grad():
        return (head(hidden).argmax(dim=-1) == targets).sum()


def chunked_cross_entropy(
    hidden: Tensor,
    head: nn.Module,
    targets: Tensor,
    logits_per_chunk: int = LOGITS_PER_CHUNK,
    with_accuracy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """mean over scored positions of cross_entropy(head(hidden), targets), in fp32 (fp64 for
    fp64); targets equal to IGNORE_INDEX are not scored, as in F.cross_entropy.

    hidden [..., D] (the final norm's output), targets [...] of the same leading shape. With
    `with_accuracy`: (loss, the share of scored positions whose greedy prediction is the
    target), the accuracy without gradient.
    """
    hidden = hidden.flatten(0, -2)
    targets = targets.flatten()
    rows = max(1, logits_per_chunk // head.out_features)
    recompute = torch.is_grad_enabled()
    total = correct = None
    for hidden_chunk, target_chunk in zip(hidden.split(rows), targets.split(rows)):
        if recompute:
            part = checkpoint(_summed_loss, head, hidden_chunk, target_chunk, use_reentrant=False)
        else:
            part = _summed_loss(head, hidden_chunk, target_chunk)
        total = part if total is None else total + part
        if with_accuracy:
            right = _correct(head, hidden_chunk, target_chunk)
            correct = right if correct is None else correct + right
    scored = (targets != IGNORE_INDEX).sum()
    loss = total / scored
    if not with_accuracy:
        return loss
    return loss, correct / scored
