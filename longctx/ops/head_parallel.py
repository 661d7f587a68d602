"""CPU kernels run with their heads split across threads: one parallel region per call.

A torch kernel issues hundreds to thousands of small operators per call (a block-sparse tile, a
chunk of a scan). With intra-op threads, each of them is a parallel region that ends in a
barrier, and on a machine where anything else runs (DataLoader workers, a second experiment, a
shared node) the OS deschedules one thread now and then: every barrier then waits for it, and
the kernel loses from its second thread (docs/results/bench_cpu/threads_under_load.md measures
it). Heads are independent in every mechanism, so `across_heads` instead gives each thread its
own group of heads and runs the whole kernel on it single-threaded: the only barrier is the
join at the end, and a descheduled thread delays its own group alone.

Autograd: each group's forward is recorded in its worker; the backward runs each group's graph
in the same workers. Under saved-tensor hooks (activation checkpointing), where a graph kept in
a worker would escape the hooks, the forward keeps only its inputs and the backward recomputes
each group. Tensors a kernel uses are passed as arguments, never captured by closures: a
captured tensor that requires grad would get no gradient from a worker's graph.

The split is skipped (the kernel runs as called) where it cannot help or must not happen: one
thread, one head, off the CPU (GPU kernels parallelise over heads themselves), small calls (a
streaming step), under a dispatch mode (operator counting sees every operator) or while
torch.compile traces.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import _get_current_dispatch_mode

# Fewer elements of the split inputs per group than this run unsplit: a group's thread start and
# join cost tens of microseconds, as much as a small call's whole work.
MIN_GROUP_ELEMENTS = 1 << 15

_local = threading.local()
_pool: dict[int, ThreadPoolExecutor] = {}


def across_heads(
    fn: Callable[..., Any], args: Sequence[Any], head_dims: Sequence[int | None], out_dim: int = 1
) -> Any:
    """fn(*args), computed with the heads in one group per intra-op thread on a CPU.

    `head_dims[i]` is the dimension that holds the heads in every tensor of `args[i]` (nested
    tuples and lists included), or None for tensors every group needs whole (their gradients
    are summed over the groups). Every tensor fn returns holds the heads at `out_dim`. fn must
    compute each head from that head's slices alone.
    """
    leaves, spec = pytree.tree_flatten(list(args))
    dims = _leaf_dims(args, head_dims)
    groups = _groups(leaves, dims)
    if groups is None:
        return fn(*args)
    tensors = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]
    call = _Call(fn, spec, leaves, dims, tensors, groups, out_dim)
    inputs = [leaves[i] for i in tensors]
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in inputs)):
        with torch.no_grad():
            outputs = call.run(_forward_without_graph)
        return call.join_outputs(outputs)
    kind = _Recomputed if _saved_tensor_hooks_active() else _KeptGraphs
    flat = kind.apply(call, *inputs)
    return pytree.tree_unflatten(list(flat), call.out_spec)


def _leaf_dims(args: Sequence[Any], head_dims: Sequence[int | None]) -> list[int | None]:
    if len(args) != len(head_dims):
        raise ValueError(f"{len(args)} arguments but {len(head_dims)} head dimensions")
    dims: list[int | None] = []
    for arg, dim in zip(args, head_dims):
        dims.extend([dim] * len(pytree.tree_leaves(arg)))
    return dims


def _groups(leaves: list[Any], dims: list[int | None]) -> list[tuple[int, int]] | None:
    """(first head, head count) per thread, or None when the call runs unsplit."""
    split = [(leaf, dim) for leaf, dim in zip(leaves, dims) if isinstance(leaf, Tensor)]
    cut = [(t, d) for t, d in split if d is not None]
    if not cut or getattr(_local, "worker", False):
        return None
    if not all(_splits_on(t.device) for t, _ in split):
        return None
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return None
    heads = cut[0][0].shape[cut[0][1]]
    # One group per thread: more, smaller groups (which would balance a descheduled thread) ran
    # slower, each operator costing one more dispatch per group.
    count = min(torch.get_num_threads(), heads)
    if count < 2 or sum(t.numel() for t, _ in cut) < count * MIN_GROUP_ELEMENTS:
        return None
    if any(t.shape[d] != heads for t, d in cut):
        raise ValueError(f"tensors split by head disagree on the head count ({heads})")
    base, extra = divmod(heads, count)
    sizes = [base + (g < extra) for g in range(count)]
    starts = [sum(sizes[:g]) for g in range(count)]
    return list(zip(starts, sizes))


def _splits_on(device: torch.device) -> bool:
    """Host memory and host threads: a GPU kernel parallelises over heads by itself."""
    return device.type == "cpu"


def _saved_tensor_hooks_active() -> bool:
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


class _Call:
    """One call: its function, arguments and head groups, and the workers' thread state."""

    def __init__(self, fn, spec, leaves, dims, tensors, groups, out_dim):
        self.fn, self.spec, self.leaves, self.dims = fn, spec, leaves, dims
        self.tensors, self.groups, self.out_dim = tensors, groups, out_dim
        self.out_spec = None
        # Thread-local state the workers must share with the caller.
        self.autocast = (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))

    def pieces(self, g: int, inputs: Sequence[Tensor]) -> list[Tensor]:
        """Group g's slices of `inputs` (the call's tensors, in order; shared ones whole)."""
        start, size = self.groups[g]
        return [
            t if self.dims[index] is None else t.narrow(self.dims[index], start, size)
            for index, t in zip(self.tensors, inputs)
        ]

    def args_with(self, tensors: Sequence[Tensor]) -> list[Any]:
        """The call's arguments with its tensors replaced by `tensors` (in order)."""
        leaves = list(self.leaves)
        for index, tensor in zip(self.tensors, tensors):
            leaves[index] = tensor
        return pytree.tree_unflatten(leaves, self.spec)

    def run(self, task: Callable[[_Call, int], Any]) -> list[Any]:
        """task(self, g) for every group g, one per worker; raises the first failure."""
        pool = _workers(len(self.groups))
        enabled, dtype = self.autocast
        grad = torch.is_grad_enabled()

        def in_worker(g: int):
            with torch.autocast("cpu", dtype=dtype, enabled=enabled), torch.set_grad_enabled(grad):
                return task(self, g)

        futures = [pool.submit(in_worker, g) for g in range(len(self.groups))]
        wait(futures)
        return [f.result() for f in futures]

    def call(self, args) -> list[Tensor]:
        flat, spec = pytree.tree_flatten(self.fn(*args))
        self.out_spec = spec
        return flat

    def join_outputs(self, outputs: list[list[Tensor]]) -> Any:
        return pytree.tree_unflatten(self.join(outputs), self.out_spec)

    def join(self, outputs: list[list[Tensor]]) -> list[Tensor]:
        return [torch.cat(parts, self.out_dim) for parts in zip(*outputs)]


def _forward_without_graph(call: _Call, g: int) -> list[Tensor]:
    inputs = [call.leaves[index] for index in call.tensors]
    return call.call(call.args_with(call.pieces(g, inputs)))


def _forward_with_graph(call: _Call, g: int, inputs: Sequence[Tensor]):
    """Group g's forward recorded on detached leaf copies of its slices of `inputs` (requiring
    grad like them): (the leaves, the outputs)."""
    leaves = [
        piece.detach().requires_grad_(tensor.requires_grad)
        for piece, tensor in zip(call.pieces(g, inputs), inputs)
    ]
    with torch.enable_grad():
        return leaves, call.call(call.args_with(leaves))


def _group_backward(leaves, outputs, grads) -> list[Tensor | None]:
    pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
    wanted = [leaf for leaf in leaves if leaf.requires_grad]
    if not pairs or not wanted:
        return [None] * len(leaves)
    found = iter(
        torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
    )
    return [next(found) if leaf.requires_grad else None for leaf in leaves]


def _output_grads(call: _Call, grads: Sequence[Tensor | None], g: int) -> list[Tensor | None]:
    start, size = call.groups[g]
    return [None if d is None else d.narrow(call.out_dim, start, size) for d in grads]


class _Meta:
    """What a zero gradient slice of an input needs, without keeping the input alive."""

    def __init__(self, tensor: Tensor):
        self.shape, self.dtype, self.device = tensor.shape, tensor.dtype, tensor.device

    def zeros(self, dim: int, size: int) -> Tensor:
        shape = list(self.shape)
        shape[dim] = size
        return torch.zeros(shape, dtype=self.dtype, device=self.device)


def _input_grads(call: _Call, inputs: Sequence[_Meta], per_group: list[list[Tensor | None]]):
    """Each input's gradient: the groups' slices joined along its head dimension, or summed for
    inputs every group read whole."""
    result = []
    for position, (index, meta) in enumerate(zip(call.tensors, inputs)):
        parts = [grads[position] for grads in per_group]
        if all(p is None for p in parts):
            result.append(None)
            continue
        dim = call.dims[index]
        if dim is None:
            result.append(sum(p for p in parts if p is not None))
            continue
        pieces = [
            meta.zeros(dim, size) if p is None else p for p, (_, size) in zip(parts, call.groups)
        ]
        result.append(torch.cat(pieces, dim))
    return tuple(result)


class _KeptGraphs(torch.autograd.Function):
    """Each group's forward graph is kept and run backward in the workers."""

    @staticmethod
    def forward(ctx, call: _Call, *inputs: Tensor):
        ctx.set_materialize_grads(False)
        graphs = call.run(lambda c, g: _forward_with_graph(c, g, inputs))
        ctx.call, ctx.graphs, ctx.inputs = call, graphs, [_Meta(t) for t in inputs]
        return tuple(call.join([[o.detach() for o in outputs] for _, outputs in graphs]))

    @staticmethod
    def backward(ctx, *grads):
        call, graphs = ctx.call, ctx.graphs
        per_group = call.run(
            lambda c, g: _group_backward(graphs[g][0], graphs[g][1], _output_grads(c, grads, g))
        )
        return (None, *_input_grads(call, ctx.inputs, per_group))


class _Recomputed(torch.autograd.Function):
    """Only the inputs are saved (through the active saved-tensor hooks); each group's forward is
    recomputed in its worker during the backward."""

    @staticmethod
    def forward(ctx, call: _Call, *inputs: Tensor):
        ctx.set_materialize_grads(False)
        ctx.call = call
        ctx.save_for_backward(*inputs)
        with torch.no_grad():
            outputs = call.run(_forward_without_graph)
        return tuple(call.join(outputs))

    @staticmethod
    def backward(ctx, *grads):
        call, inputs = ctx.call, ctx.saved_tensors

        def recompute_and_backward(c: _Call, g: int):
            leaves, outputs = _forward_with_graph(c, g, inputs)
            return _group_backward(leaves, outputs, _output_grads(c, grads, g))

        per_group = call.run(recompute_and_backward)
        return (None, *_input_grads(call, [_Meta(t) for t in inputs], per_group))


def _workers(count: int) -> ThreadPoolExecutor:
    """A pool of `count` threads, each running torch single-threaded."""
    pool = _pool.get(count)
    if pool is not None:
        return pool
    caller_threads = torch.get_num_threads()
    ready = threading.Barrier(count)

    def start_worker() -> None:
        _local.worker = True
        # A thread takes the process-wide count on its first parallel call unless it has done so
        # already: do it now, so that the count set next stays this thread's.
        torch.get_num_threads()
        torch.set_num_threads(1)
        ready.wait()

    pool = ThreadPoolExecutor(count, thread_name_prefix="longctx-heads")
    wait([pool.submit(start_worker) for _ in range(count)])
    # set_num_threads also stores the count that threads started later begin with; give them the
    # caller's again (the workers keep their own).
    torch.set_num_threads(caller_threads)
    _pool[count] = pool
    return pool


def _forget_workers() -> None:
    """A forked child has none of its parent's threads."""
    _pool.clear()


os.register_at_fork(after_in_child=_forget_workers)
