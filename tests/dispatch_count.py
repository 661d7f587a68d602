"""Counting what a step asks of the device, without a device: aten ops dispatched, Triton kernels
launched, host syncs (`aten._local_scalar_dense`: `.item()`, `.tolist()`, `bool(tensor)`, and
every shape that depends on tensor values)."""

from __future__ import annotations

import collections
import importlib.util

from torch.utils._python_dispatch import TorchDispatchMode

HOST_SYNC = "aten._local_scalar_dense"


class DispatchCount(TorchDispatchMode):
    """Counts, while active, the aten ops dispatched (`ops`, by name) and the Triton kernels
    launched (`launches`, by kernel name; with triton installed).

    Under Triton's interpreter a launch also dispatches the aten ops that copy the kernel's
    arguments to host buffers and back; they are the interpreter's, not the kernel's (compiled,
    a launch dispatches none), so they are left out of `ops`.
    """

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.launches: collections.Counter[str] = collections.Counter()
        self._inside_launch = 0
        self._restore = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self._inside_launch:
            self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def host_syncs(self) -> int:
        return self.ops[HOST_SYNC]

    def total(self) -> int:
        """aten ops dispatched plus Triton kernels launched."""
        return sum(self.ops.values()) + sum(self.launches.values())

    def __enter__(self):
        if importlib.util.find_spec("triton") is not None:
            self._count_launches()
        return super().__enter__()

    def __exit__(self, *exc):
        for owner, name, original in self._restore:
            setattr(owner, name, original)
        self._restore.clear()
        return super().__exit__(*exc)

    def _count_launches(self) -> None:
        """Wrap the innermost launch of compiled and of interpreted kernels (autotuners and
        heuristics wrappers end in one of them, so each launch counts once)."""
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        for owner in (JITFunction, InterpretedFunction):
            original = owner.run

            def run(kernel, *args, _original=original, **kwargs):
                if kwargs.get("warmup"):
                    return _original(kernel, *args, **kwargs)
                self.launches[getattr(kernel.fn, "__name__", repr(kernel.fn))] += 1
                self._inside_launch += 1
                try:
                    return _original(kernel, *args, **kwargs)
                finally:
                    self._inside_launch -= 1

            self._restore.append((owner, "run", original))
            owner.run = run
