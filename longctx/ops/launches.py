"""Counting what a step dispatches and where it waits for the device, without timing anything.

`LaunchCounter` is a TorchDispatchMode. While it is active it counts:
- `aten_ops`: every aten operator dispatched. On a GPU each is one kernel launch or more (views
  and metadata ops are counted too: they still cost a dispatch), so a step that dispatches
  thousands of them is launch-bound whatever the device;
- `host_syncs`: operators that make the host wait for the device's result: `_local_scalar_dense`
  (`.item()`, `int(t)`, `bool(t)`, `.tolist()`, Python control flow on a tensor), `nonzero`
  (boolean indexing, one-argument `torch.where`) and `masked_select`, on any device, so that a
  CPU run shows the syncs a GPU run would make;
- `triton_launches`: Triton kernels launched (through triton's launcher, when triton is loaded);
  under TRITON_INTERPRET=1 a launch also dispatches the aten ops that copy its arguments to host
  buffers and back: they are the interpreter's, not the kernel's, and are not counted;
- `opaque_launches`: compiled kernels run as one unit (`run_opaque`: FlexAttention), counted as
  the launches they make on a GPU, stated by their caller.

Counts depend only on shapes and on the code path, so they are exact and repeatable.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

# Operators whose result the host must read back before it can go on.
SYNC_OPS = frozenset({"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select"})
# Indexing with a boolean mask sizes its result by the mask's contents (a nonzero inside).
MASK_INDEXING_OPS = frozenset({"aten::index", "aten::index_put", "aten::index_put_"})

_active: list[LaunchCounter] = []


class LaunchCounter(TorchDispatchMode):
    """Counts operators, host syncs and launches while active: `with LaunchCounter() as c`."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.triton_launches = 0
        self.opaque_launches = 0
        self.inside_triton = 0  # depth of Triton launches running now
        self._unpatch: Callable[[], None] | None = None

    @property
    def aten_ops(self) -> int:
        return sum(self.ops.values())

    @property
    def host_syncs(self) -> int:
        return sum(count for name, count in self.ops.items() if name in SYNC_OPS)

    @property
    def kernel_launches(self) -> int:
        """aten operators dispatched + Triton kernels launched + launches of opaque kernels."""
        return self.aten_ops + self.triton_launches + self.opaque_launches

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.inside_triton:  # the interpreter's own copies, not the step's
            return func(*args, **(kwargs or {}))
        name = func._schema.name
        if name in MASK_INDEXING_OPS and _has_mask_index(args):
            name = "aten::nonzero"  # counted as the sync it makes, once per mask
        self.ops[name] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        _active.append(self)
        self._unpatch = _count_triton_launches(self)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            _active.remove(self)
            if self._unpatch is not None:
                self._unpatch()


def _has_mask_index(args) -> bool:
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(isinstance(t, Tensor) and t.dtype == torch.bool for t in indices)


def run_opaque(
    fn: Callable[..., Tensor | tuple[Tensor, ...]],
    inputs: Sequence[Tensor],
    forward_launches: int,
    backward_launches: int,
) -> Tensor | tuple[Tensor, ...]:
    """`fn(*inputs)`, a compiled kernel; under a LaunchCounter, one opaque unit.

    Compiled code cannot run under a Python dispatch mode (dynamo refuses to trace there), and
    what it launches on a GPU is not what it dispatches on the CPU. So while a counter is active
    the call runs on detached inputs with the mode suspended and counts `forward_launches`; its
    backward, which may not exist on the CPU (FlexAttention's), is stood in for by zero gradients
    counted as `backward_launches`. Values under a counter therefore serve counting only.
    """
    if not _active:
        return fn(*inputs)
    counter = _active[-1]
    counter.opaque_launches += forward_launches
    with _disable_current_modes(), torch.no_grad():
        output = fn(*(t.detach() for t in inputs))
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in inputs)):
        return output
    single = isinstance(output, Tensor)
    outputs = (output,) if single else tuple(output)
    results = _CountedBackward.apply(counter, backward_launches, len(outputs), *outputs, *inputs)
    return results[0] if single else results


class _CountedBackward(torch.autograd.Function):
    """Identity on the outputs that gives the inputs zero gradients and counts the launches."""

    @staticmethod
    def forward(ctx, counter, launches, n_outputs, *tensors):
        outputs, inputs = tensors[:n_outputs], tensors[n_outputs:]
        ctx.counter, ctx.launches, ctx.n_outputs = counter, launches, n_outputs
        ctx.shapes = [(t.shape, t.dtype, t.device) for t in inputs]
        return tuple(t.view_as(t) for t in outputs)

    @staticmethod
    def backward(ctx, *grads):
        ctx.counter.opaque_launches += ctx.launches
        with _disable_current_modes():
            zeros = [torch.zeros(s, dtype=d, device=v) for s, d, v in ctx.shapes]
        return (None, None, None, *([None] * ctx.n_outputs), *zeros)


def _count_triton_launches(counter: LaunchCounter) -> Callable[[], None] | None:
    """Wrap triton's kernel runners so each launch counts once (None when triton is not loaded).

    Compiled and interpreted (TRITON_INTERPRET=1) kernels run through `run`; an autotuner or a
    heuristics wrapper calls its kernel's `run` in turn, so only the outermost call counts.
    """
    if "triton" not in sys.modules:
        return None
    runners = []
    for module_name, class_name in (
        ("triton.runtime.jit", "JITFunction"),
        ("triton.runtime.interpreter", "InterpretedFunction"),
        ("triton.runtime.autotuner", "Autotuner"),
        ("triton.runtime.autotuner", "Heuristics"),
    ):
        cls = getattr(sys.modules.get(module_name), class_name, None)
        if cls is not None and "run" in vars(cls):
            runners.append(cls)

    def wrap(run):
        def counted(self, *args, **kwargs):
            if counter.inside_triton == 0 and not kwargs.get("warmup"):
                counter.triton_launches += 1
            counter.inside_triton += 1
            try:
                return run(self, *args, **kwargs)
            finally:
                counter.inside_triton -= 1

        return counted

    originals = {cls: vars(cls)["run"] for cls in runners}
    for cls, run in originals.items():
        cls.run = wrap(run)

    def unpatch() -> None:
        for cls, run in originals.items():
            cls.run = run

    return unpatch
