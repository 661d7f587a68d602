"""Operations on nested streaming states (tuples, lists and dicts of tensors)."""

from __future__ import annotations

import torch


def map_state(fn, state):
    if isinstance(state, torch.Tensor):
        return fn(state)
    if isinstance(state, dict):
        return {k: map_state(fn, v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(map_state(fn, v) for v in state)
    return state


def detach_state(state):
    """Stop gradients at the batch boundary (truncated back-propagation through time)."""
    return map_state(torch.Tensor.detach, state)


def reset_rows(state, fresh, rows: torch.Tensor):
    """Replace the batch rows flagged in `rows` by their fresh state (a new document starts).

    Tensors with the batch on dim 0 and the same shape as the fresh state are mixed row-wise.
    A tensor whose length differs from the fresh one (a memory that grows from empty) cannot
    be mixed per row: it is emptied for all rows only when every row restarts, and otherwise
    kept (the document separator token then tells the model that the context changed).
    """
    if not bool(rows.any()):
        return state
    if bool(rows.all()):
        return fresh
    if isinstance(state, torch.Tensor):
        if state.shape == fresh.shape and state.ndim >= 1 and state.shape[0] == rows.shape[0]:
            mask = rows.view(-1, *([1] * (state.ndim - 1)))
            return torch.where(mask, fresh, state)
        return state
    if isinstance(state, dict):
        return {k: reset_rows(v, fresh[k], rows) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(reset_rows(v, f, rows) for v, f in zip(state, fresh))
    return state
