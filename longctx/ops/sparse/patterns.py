"""The sparse softmax patterns of docs/attention.md, declared once.

A `Component` is one head group's pattern. It declares:
- `allowed(i, j)`: the predicate P(i, j) of docs/attention.md (callers always add j <= i), used by
  the dense reference and by streaming steps;
- `build_parts(n)`: its disjoint parts for the CPU engine (block layouts, see layouts.py);
- `slot_plans(n, device)`: the same pattern as FlexAttention calls (slot orders and intervals,
  see flex.py);
- `keep(j, start)`: the streaming cache policy, whether a query at position >= start may still
  read key j.
A `LayerPattern` assigns components to contiguous head groups of one layer.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from longctx.ops.head_parallel import across_heads
from longctx.ops.sparse.engine import Part, SelfPart, attend_parts, computed_pairs
from longctx.ops.sparse.flex import (
    SlotPlan,
    make_plan,
    residue_slots,
    summaries_through,
    summary_positions,
)
from longctx.ops.sparse.layouts import (
    band_layout,
    engine_block,
    prefix_layout,
    residue_layout,
    summary_layout,
)


class Component(ABC):
    """One head group's pattern (subclasses are frozen dataclasses, so parts cache by value)."""

    @abstractmethod
    def allowed(self, i: Tensor, j: Tensor) -> Tensor:
        """The pattern's predicate: may query position i read key position j?"""

    @abstractmethod
    def build_parts(self, n: int) -> tuple[Part, ...]:
        """The engine parts (block layouts, self part) that cover the predicate over n positions."""

    @abstractmethod
    def slot_plans(self, n: int, device: torch.device) -> tuple[SlotPlan, ...]:
        """The predicate over n positions as Flex calls (one, unless query orders differ)."""

    @abstractmethod
    def keep(self, j: Tensor, start: int) -> Tensor:
        """Which cached key positions j streaming must keep once queries reach `start`."""


@functools.lru_cache(maxsize=32)
def component_parts(component: Component, n: int) -> tuple[Part, ...]:
    """Layouts depend only on the pattern and the length: built once, shared by layers and steps."""
    return component.build_parts(n)


@dataclass(frozen=True)
class Window(Component):
    """Keys i - dilation*m for m < window, plus the first `globals` positions (Longformer)."""

    window: int
    dilation: int = 1
    globals: int = 0

    def _in_window(self, i: Tensor, j: Tensor) -> Tensor:
        distance = i - j
        if self.dilation == 1:
            return distance < self.window
        return (distance % self.dilation == 0) & (distance < self.dilation * self.window)

    def allowed(self, i, j):
        return self._in_window(i, j) | (j < self.globals)

    def build_parts(self, n):
        # Global keys live in their own part, so the window part drops them (each key counted once).
        def windowed(i, j):
            return self._in_window(i, j) & (j >= self.globals)

        block = engine_block(self.window)
        if self.dilation == 1:
            parts = [band_layout(n, block, lambda i: i - (self.window - 1), lambda i: i, windowed)]
        else:
            parts = [residue_layout(n, block, self.dilation, self.window, windowed)]
        if self.globals:
            parts.append(
                prefix_layout(
                    n, engine_block(self.globals), self.globals, lambda i, j: j < self.globals
                )
            )
        return tuple(parts)

    def slot_plans(self, n, device):
        prefix = min(self.globals, n)
        if self.dilation == 1:
            i = torch.arange(n, device=device)
            window = ((i - (self.window - 1)).clamp_min(0), i)
            globals_ = (torch.zeros_like(i), i.clamp(max=prefix - 1))
            return (make_plan(n, None, [None], [window, globals_][: 1 + bool(prefix)], device),)
        # By residue mod the dilation, the window is the last `window` slots of the query's class,
        # minus the class's positions below `globals`, which the prefix region after it holds.
        pos, class_start = residue_slots(n, self.dilation, device)
        slot = torch.arange(n, device=device)
        below = ((prefix - pos % self.dilation + self.dilation - 1) // self.dilation).clamp_min(0)
        window = (torch.maximum(class_start + below, slot - (self.window - 1)), slot)
        globals_ = (torch.full_like(slot, n), n + pos.clamp(max=prefix - 1))
        regions = [pos, torch.arange(prefix, device=device)]
        return (make_plan(n, pos, regions, [window, globals_], device),)

    def keep(self, j, start):
        return (j >= self.first_key(start)) | (j < self.globals)

    def first_key(self, i):
        return i - self.dilation * (self.window - 1)


@dataclass(frozen=True)
class Causal(Component):
    """Every key j <= i: full attention, as a pattern (ALiBi on the engine, Flex's kernels)."""

    def allowed(self, i, j):
        return torch.ones_like(i - j, dtype=torch.bool)

    def build_parts(self, n):
        return (
            band_layout(
                n, engine_block(n), lambda i: torch.zeros_like(i), lambda i: i, self.allowed
            ),
        )

    def slot_plans(self, n, device):
        i = torch.arange(n, device=device)
        return (make_plan(n, None, [None], [(torch.zeros_like(i), i)], device),)

    def keep(self, j, start):
        return torch.ones_like(j, dtype=torch.bool)


@dataclass(frozen=True)
class LocalBlocks(Component):
    """Liu et al. local attention: blocks of `block`, reading `look_back` previous blocks."""

    block: int
    look_back: int = 0

    def allowed(self, i, j):
        return i // self.block - j // self.block <= self.look_back

    def build_parts(self, n):
        return (
            band_layout(n, engine_block(self.block), self.first_key, lambda i: i, self.allowed),
        )

    def slot_plans(self, n, device):
        i = torch.arange(n, device=device)
        return (make_plan(n, None, [None], [(self.first_key(i).clamp_min(0), i)], device),)

    def keep(self, j, start):
        return j >= self.first_key(start)

    def first_key(self, i):
        return (i // self.block - self.look_back) * self.block


@dataclass(frozen=True)
class ShiftedBlock(Component):
    """Causal BlockBERT head group: block b reads block b - shift (shift > 0),
    and each query itself."""

    block: int
    shift: int

    def _target(self, i: Tensor, j: Tensor) -> Tensor:
        return i // self.block - j // self.block == self.shift

    def allowed(self, i, j):
        return self._target(i, j) | (j == i)

    def build_parts(self, n):
        def last_key(i):
            return (i // self.block - self.shift + 1) * self.block - 1

        shifted = band_layout(n, engine_block(self.block), self.first_key, last_key, self._target)
        # j = i never lies in block b - shift,
        # so "itself" is a disjoint part (the only one when b < shift).
        return shifted, SelfPart(lambda i: torch.ones_like(i, dtype=torch.bool))

    def slot_plans(self, n, device):
        i = torch.arange(n, device=device)
        target = (self.first_key(i).clamp_min(0), self.first_key(i) + self.block - 1)
        return (make_plan(n, None, [None], [target, (i, i)], device),)

    def keep(self, j, start):
        return j >= self.first_key(start)

    def first_key(self, i):
        return (i // self.block - self.shift) * self.block


@dataclass(frozen=True)
class ResidueClass(Component):
    """Sparse Transformer strided A2: (i - j) mod stride == 0, every earlier key of the class."""

    stride: int

    def allowed(self, i, j):
        return (i - j) % self.stride == 0

    def build_parts(self, n):
        block = engine_block(-(-n // self.stride))
        return (residue_layout(n, block, self.stride, None, self.allowed),)

    def slot_plans(self, n, device):
        pos, class_start = residue_slots(n, self.stride, device)
        slot = torch.arange(n, device=device)
        return (make_plan(n, pos, [pos], [(class_start, slot)], device),)

    def keep(self, j, start):
        return torch.ones_like(j, dtype=torch.bool)


@dataclass(frozen=True)
class StridedUnion(Component):
    """Strided A1 ∪ A2 in every head: i - j <= stride, or (i - j) mod stride == 0."""

    stride: int

    def allowed(self, i, j):
        return (i - j <= self.stride) | ((i - j) % self.stride == 0)

    def build_parts(self, n):
        recent = Window(self.stride + 1).build_parts(n)[0]

        def older_same_residue(i, j):  # i - stride itself belongs to the window part
            return ((i - j) % self.stride == 0) & (i - j > self.stride)

        block = engine_block(-(-n // self.stride))
        return recent, residue_layout(n, block, self.stride, None, older_same_residue)

    def slot_plans(self, n, device):
        # Two query orders (natural for the window, by residue for the older keys of the class):
        # two Flex calls, merged by their log-sum-exps.
        (recent,) = Window(self.stride + 1).slot_plans(n, device)
        pos, class_start = residue_slots(n, self.stride, device)
        slot = torch.arange(n, device=device)
        older = make_plan(n, pos, [pos], [(class_start, slot - 2)], device)
        return recent, older

    def keep(self, j, start):
        return torch.ones_like(j, dtype=torch.bool)


@dataclass(frozen=True)
class SummaryColumns(Component):
    """Sparse Transformer fixed A2: the last `summary` positions of every block of `stride`,
    and j = i."""

    stride: int
    summary: int

    def _is_summary(self, j: Tensor) -> Tensor:
        return j % self.stride >= self.stride - self.summary

    def allowed(self, i, j):
        return self._is_summary(j) | (j == i)

    def build_parts(self, n):
        columns = summary_layout(
            n,
            engine_block(self.summary),
            self.stride,
            self.summary,
            lambda i, j: self._is_summary(j),
        )
        # A query on a summary column already reads itself in `columns`.
        return columns, SelfPart(lambda i: ~self._is_summary(i))

    def slot_plans(self, n, device):
        # Keys: the summary columns, then every position (for j = i of the other queries).
        i = torch.arange(n, device=device)
        columns = summary_positions(n, self.stride, self.summary, device)
        count = len(columns)
        own = count + i
        itself = (own, own - self._is_summary(i).long())
        read_columns = (torch.zeros_like(i), summaries_through(i, self.stride, self.summary) - 1)
        return (make_plan(n, None, [columns, None], [read_columns, itself], device),)

    def keep(self, j, start):
        return self._is_summary(j)


@dataclass(frozen=True)
class FixedUnion(Component):
    """Fixed A1 ∪ A2 in every head: the query's own block of `stride`, or a summary column."""

    stride: int
    summary: int

    def allowed(self, i, j):
        return (i // self.stride == j // self.stride) | (
            j % self.stride >= self.stride - self.summary
        )

    def build_parts(self, n):
        own_block = LocalBlocks(self.stride).build_parts(n)[0]

        def earlier_summary(i, j):  # summaries of the query's own block belong to `own_block`
            return (j % self.stride >= self.stride - self.summary) & (
                j // self.stride < i // self.stride
            )

        columns = summary_layout(
            n, engine_block(self.summary), self.stride, self.summary, earlier_summary
        )
        return own_block, columns

    def slot_plans(self, n, device):
        # Keys: every position (the own block), then the summary columns of earlier blocks.
        i = torch.arange(n, device=device)
        columns = summary_positions(n, self.stride, self.summary, device)
        own_block = (i // self.stride * self.stride, i)
        earlier = (torch.full_like(i, n), n + i // self.stride * self.summary - 1)
        return (make_plan(n, None, [None, columns], [own_block, earlier], device),)

    def keep(self, j, start):
        return (j % self.stride >= self.stride - self.summary) | (
            j >= start // self.stride * self.stride
        )


def _by_head(h: Tensor, groups, values) -> Tensor:
    """Per-head selection: group k's value where h falls in group k
    (groups are contiguous, in order)."""
    result = values[-1]
    for (_, end, _), value in zip(reversed(groups[:-1]), reversed(values[:-1])):
        result = torch.where(h < end, value, result)
    return result


@dataclass(frozen=True)
class LayerPattern:
    """One layer's pattern: components on contiguous head groups
    (first head, end head, component)."""

    n_head: int
    groups: tuple[tuple[int, int, Component], ...]

    @classmethod
    def uniform(cls, n_head: int, component: Component) -> LayerPattern:
        return cls(n_head, ((0, n_head, component),))

    @classmethod
    def split(cls, n_head: int, components: list[Component]) -> LayerPattern:
        """Heads split evenly, in order, among `components` (n_head divisible by their number)."""
        size = n_head // len(components)
        return cls(n_head, tuple((k * size, (k + 1) * size, c) for k, c in enumerate(components)))

    def allowed(self, h: Tensor, i: Tensor, j: Tensor) -> Tensor:
        """The spec predicate P(i, j) of head h (longctx.ops.softmax.masked.Predicate)."""
        return _by_head(h, self.groups, [c.allowed(i, j) for _, _, c in self.groups])

    def keep(self, j: Tensor, start: int) -> Tensor:
        """Keys any head may still read from a query at position >= start."""
        return functools.reduce(torch.logical_or, [c.keep(j, start) for _, _, c in self.groups])

    def computed_pairs(self, n: int) -> int:
        """(query, key) pairs the CPU engine computes, summed over heads."""
        return sum(
            (end - first) * sum(computed_pairs(part, n) for part in component_parts(component, n))
            for first, end, component in self.groups
        )

    # Dynamo would unroll the engine's Python loop over chunks (hundreds of iterations): a
    # compiled model runs this part eagerly instead.
    @torch.compiler.disable
    def attend(self, q: Tensor, k: Tensor, v: Tensor, slopes: Tensor | None) -> Tensor:
        """The block-sparse engine, head group by head group."""
        outputs = []
        for first, end, component in self.groups:
            heads = slice(first, end)
            group_slopes = None if slopes is None else slopes[heads]
            parts = component_parts(component, q.shape[-2])
            outputs.append(
                across_heads(
                    attend_parts,
                    (q[:, heads], k[:, heads], v[:, heads], parts, group_slopes),
                    (1, 1, 1, None, 0),
                )
            )
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, 1)
