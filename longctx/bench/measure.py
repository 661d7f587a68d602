"""Clocks and memory gauges for one configuration, run inside its fresh worker process.

Time: wall-clock per call, synchronised (CUDA events on a GPU, perf_counter on the CPU).
Memory, three honest gauges:
- allocator peak: the highest live-byte count of tensors allocated during one call, above what
  was live before it. CUDA: torch.cuda.max_memory_allocated. CPU: the allocator's own
  allocation/free events recorded by torch.profiler(profile_memory=True), which include the
  scratch buffers that kernels allocate internally (invisible to Python-level hooks);
- peak RSS delta: the process's resident-set high-water mark (VmHWM, reset at the start of the
  worker through /proc/self/clear_refs) minus its resident set then: everything the
  configuration made, inputs and weights included, as the OS saw it;
- the streaming state's size, for decode (counted from its tensors).

Page faults (CPU): the minor faults each timed call took, i.e. pages the OS had to map and zero
for it. Memory the C allocator hands back to the OS between calls is faulted again on the next
one, so this figure says how much of a row's time depends on `cpu_allocator` (allocator.py
states what a fault costs).
"""

from __future__ import annotations

import contextlib
import os
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

MIB = 2**20
PAGE_BYTES = resource.getpagesize()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class TimedCalls:
    seconds: list[float]
    minor_faults: list[int] | None  # per call; None on CUDA, where host page faults say nothing


def minor_faults() -> int:
    """Page faults this process (all its threads) has taken that needed no I/O: fresh pages."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_calls(
    fn: Callable[[], Any], warmup: int, repeats: int, device: torch.device
) -> TimedCalls:
    """Seconds (and on the CPU minor page faults) of each of `repeats` calls of `fn` after
    `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type == "cuda":
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return TimedCalls(times, None)
    times, faults = [], []
    for _ in range(repeats):
        faults_before = minor_faults()
        start_s = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start_s)
        faults.append(minor_faults() - faults_before)
    return TimedCalls(times, faults)


def median(values: list[float]) -> float:
    return statistics.median(values)


@contextlib.contextmanager
def _stderr_silenced():
    """Kineto prints 'profiler_start/stop' lines on fd 2 for every profile;
    keep the log readable."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def allocator_peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated during one call of `fn` above the bytes live before it."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with (
        _stderr_silenced(),
        profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        fn()
    events = [
        event
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    ]
    live = peak = 0
    for event in sorted(events, key=lambda event: event.start_ns()):
        live += event.nbytes()  # negative for frees
        peak = max(peak, live)
    return peak


def _proc_status_kib(field: str) -> int | None:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


class RssGauge:
    """Peak resident-set growth of this process since `start()` (Linux /proc; None elsewhere)."""

    def __init__(self) -> None:
        self.baseline_kib: int | None = None
        self.reset_ok = False

    def start(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")  # 5 = reset the peak RSS (VmHWM) to the current RSS
            self.reset_ok = True
        except OSError:
            self.reset_ok = False  # the peak then includes what the parent process had touched
        self.baseline_kib = (
            _proc_status_kib("VmRSS") if os.path.exists("/proc/self/status") else None
        )

    def peak_delta_bytes(self) -> int | None:
        if self.baseline_kib is None or not self.reset_ok:
            return None
        return (_proc_status_kib("VmHWM") - self.baseline_kib) * 1024


def state_size(state: Any) -> tuple[int, int]:
    """(elements, bytes) of every tensor in a nested tuple/list/dict state."""
    if isinstance(state, torch.Tensor):
        return state.numel(), state.numel() * state.element_size()
    if isinstance(state, dict):
        state = list(state.values())
    if isinstance(state, (list, tuple)):
        sizes = [state_size(item) for item in state]
        return sum(s[0] for s in sizes), sum(s[1] for s in sizes)
    return 0, 0
