"""Activation checkpointing per block: which blocks keep only their inputs for the backward pass.

A checkpointed block saves its inputs (the residual stream, and the carried state when it
streams) instead of every intermediate tensor, and runs its forward a second time during the
backward pass. torch.utils.checkpoint in its non-reentrant form is used: it supports any nested
inputs and outputs (streaming states), keyword arguments, and FSDP's and DDP's hooks, and it
replays the RNG state so that dropout draws the same masks when it recomputes.
"""

from __future__ import annotations

import re

from longctx.errors import ConfigError

NONE = "none"
BLOCKS = "blocks"
_EVERY = re.compile(r"every_([1-9][0-9]*)")
CHOICES = (NONE, BLOCKS, "every_<k>")


def checkpointed_blocks(setting: str, n_layer: int) -> frozenset[int]:
    """The indices of the blocks that `model.activation_checkpointing=<setting>` checkpoints.

    `none`: no block; `blocks`: every block; `every_<k>`: blocks 0, k, 2k, ... (one in k), which
    trades part of the memory for part of the recomputation.
    """
    if setting == NONE:
        return frozenset()
    if setting == BLOCKS:
        return frozenset(range(n_layer))
    match = _EVERY.fullmatch(str(setting))
    if match is None:
        raise ConfigError(
            f"model.activation_checkpointing={setting!r} is not valid; choose none, blocks "
            "(every block keeps only its input and is recomputed in the backward pass) or "
            "every_<k> (one block in k, e.g. every_2)"
        )
    return frozenset(range(0, n_layer, int(match.group(1))))
