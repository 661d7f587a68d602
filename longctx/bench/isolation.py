"""Run each configuration in a fresh process, so its peak memory is its own.

Workers are forked from a forkserver that has imported torch and the backends but never
computed anything: a fresh process costs milliseconds instead of the ~2 s of a new
interpreter, and no allocator cache, thread pool or high-water mark carries over.
"""

from __future__ import annotations

import multiprocessing
from typing import Any

from longctx.bench.config import Config
from longctx.bench.worker import base_row, run_isolated

# torch.profiler's first use imports torch._inductor (about a second): pay it once, here.
PRELOAD = ["longctx.attention", "longctx.bench.worker", "torch._inductor.config"]


class IsolatedRunner:
    def __init__(self, extra_preload: list[str] = ()):
        self.context = multiprocessing.get_context("forkserver")
        # Failed preloads are ignored by the forkserver; the worker then imports on demand.
        self.context.set_forkserver_preload(PRELOAD + list(extra_preload))

    def run(self, config: Config, timeout_s: float) -> dict[str, Any]:
        """The row measured by a fresh process;
        skipped if it ran past timeout_s, error if it died."""
        receiver, sender = self.context.Pipe(duplex=False)
        process = self.context.Process(target=run_isolated, args=(config, sender), daemon=True)
        process.start()
        sender.close()  # only the worker holds the sending end: its death makes recv() fail
        row = None
        timed_out = not receiver.poll(timeout_s)  # a dead worker ends the wait too (EOF)
        if timed_out:
            process.kill()
        else:
            try:
                row = receiver.recv()
            except EOFError:
                pass
        receiver.close()
        process.join()
        if row is not None:
            return row
        row = base_row(config)
        if timed_out:
            row.update(
                status="skipped",
                reason=f"over the time budget: killed after {timeout_s:g} s",
                wall_s=timeout_s,
            )
        else:  # e.g. the kernel's OOM killer (-9) or a crash in native code (-11)
            row.update(status="error", reason=f"worker died with exit code {process.exitcode}")
        return row
