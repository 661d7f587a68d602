"""The receptive-field probe the backend tests share: which inputs change which outputs."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# Far below any real effect of one input on an output, far above fp64 rounding of a batch row.
THRESHOLD = 1e-9


def changed_outputs(forward: Callable[[Tensor], Tensor], x: Tensor, vocab: int = 0) -> Tensor:
    """changed[i, j]: does changing input j change output i? x [1, n] token ids (then each is
    replaced by the next id mod `vocab`) or [1, n, d] vectors (then 1 is added).

    One batched call: row 0 is x, row 1 + j is x with position j changed. Use fp64 weights: the
    outputs are compared at THRESHOLD, not bit for bit (a batched kernel may round row by row).
    """
    n = x.shape[1]
    batch = x.repeat(n + 1, *([1] * (x.dim() - 1)))
    positions = torch.arange(n)
    if x.dtype == torch.long:
        batch[1 + positions, positions] = (batch[1 + positions, positions] + 1) % vocab
    else:
        batch[1 + positions, positions] += 1.0
    with torch.no_grad():
        outputs = forward(batch)
    assert outputs.dtype == torch.float64, "probe fp64 models: the threshold assumes fp64"
    return ((outputs[1:] - outputs[:1]).abs().amax(-1) > THRESHOLD).T


def receptive_field(model, n: int, seed: int = 3) -> Tensor:
    """[n, n] bool: does token j change the logits at i, for random tokens of a LanguageModel."""
    ids = torch.randint(0, model.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))
    return changed_outputs(model, ids, model.vocab_size)
