"""Measure one configuration and describe it as a row (runs inside a fresh worker process).

Failures never escape: a ConfigError (e.g. N above a backend's max_len) or an allocation over
the memory cap makes a "skipped" row, anything else an "error" row, each with its reason.
"""

from __future__ import annotations

import dataclasses
import resource
import time
from typing import Any

import torch

from longctx.bench.allocator import configure_cpu_allocator
from longctx.bench.anchors import ANCHORS
from longctx.bench.config import DTYPES, Config
from longctx.bench.launches import count_block_step
from longctx.bench.measure import (
    MIB,
    PAGE_BYTES,
    RssGauge,
    allocator_peak_bytes,
    median,
    time_calls,
)
from longctx.bench.workloads import build_workload
from longctx.errors import ConfigError
from longctx.flops import mfu, peak_flops
from longctx.ops.seam import AUTO

# Address space granted beyond the cap for what is not tensor data: thread stacks, malloc
# arenas, kernels' libraries mapped on first use.
ADDRESS_SPACE_SLACK = 2 * 2**30
OUT_OF_MEMORY = ("can't allocate memory", "out of memory", "cannot allocate memory")
# Every row has these keys (None where a mode or a failure leaves them unmeasured).
MEASUREMENTS = (
    "time_ms",
    "time_ms_min",
    "times_ms",
    "tokens_per_s",
    "gflops_per_s",
    "memory_mib",
    "peak_alloc_mib",
    "peak_rss_mib",
    "faulted_mib",
    "state_elements",
    "state_mib",
    "prefill_ms",
    "parameters",
    "threads",
    "wall_s",
    "mfu",
    "kernel_launches",
    "aten_ops",
    "triton_launches",
    "opaque_launches",
    "host_syncs",
    # Filled by the parent under `load` > 0 (longctx/bench/run.py, report.add_slowdowns).
    "time_ms_loaded",
    "slowdown",
    "slowdown_vs_sdpa",
)


def label(config: Config) -> str:
    if config.kind == "baseline":
        return "SDPA over a growing KV cache" if config.mode == "decode" else "SDPA is_causal=True"
    if config.kind == "anchor":
        return "anchor: " + ANCHORS[config.subject].label
    settings = {**config.options, **({} if config.kernel == AUTO else {"kernel": config.kernel})}
    options = ", ".join(f"{k}={v}" for k, v in settings.items())
    return f"{config.subject} ({options})" if options else config.subject


def base_row(config: Config) -> dict[str, Any]:
    row = {
        key: value
        for key, value in dataclasses.asdict(config).items()
        if key not in ("warmup", "repeats", "memory_cap_mib", "threads", "seed", "prefill_chunk")
    }
    row.update(label=label(config), status="ok", reason="")
    row.update(dict.fromkeys(MEASUREMENTS))
    row["threads"] = config.threads  # the setting until a worker measures the count it ran with
    return row


def _limit_memory(config: Config) -> None:
    """Make allocations past the cap fail inside this process instead of starving the machine."""
    if not config.memory_cap_mib:
        return
    cap = int(config.memory_cap_mib * MIB)
    if config.device.startswith("cuda"):
        total = torch.cuda.get_device_properties(torch.device(config.device)).total_memory
        torch.cuda.set_per_process_memory_fraction(
            min(1.0, cap / total), torch.device(config.device)
        )
        return
    with open("/proc/self/status") as status:
        vm_size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = vm_size + cap + ADDRESS_SPACE_SLACK
    resource.setrlimit(
        resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard)
    )


def _measure(config: Config, row: dict[str, Any], rss: RssGauge) -> None:
    configure_cpu_allocator(config.cpu_allocator)
    torch.manual_seed(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    if config.mode == "launches":  # a count: nothing is timed
        row.update(count_block_step(config))
        return
    workload = build_workload(config)
    decoding = config.mode == "decode"
    calls = time_calls(
        workload.call, config.warmup, config.decode_tokens if decoding else config.repeats, device
    )
    times = calls.seconds
    peak_alloc = allocator_peak_bytes(workload.call, device)
    seconds = median(times)
    rss_delta = rss.peak_delta_bytes()
    row.update(workload.info)
    row.update(
        time_ms=seconds * 1e3,
        time_ms_min=min(times) * 1e3,
        times_ms=[t * 1e3 for t in times],
        tokens_per_s=workload.tokens_per_call / seconds,
        gflops_per_s=workload.flops_per_call / seconds / 1e9 if workload.flops_per_call else None,
        peak_alloc_mib=peak_alloc / MIB,
        peak_rss_mib=rss_delta / MIB if rss_delta is not None else None,
        faulted_mib=median(calls.minor_faults) * PAGE_BYTES / MIB if calls.minor_faults else None,
        threads=torch.get_num_threads(),
    )
    # The headline memory of a row: what the mode's cost is about.
    row["memory_mib"] = row["state_mib"] if decoding else row["peak_alloc_mib"]
    if config.mode == "train_step" and workload.flops_per_call:
        flops_per_token = workload.flops_per_call / workload.tokens_per_call
        peak = peak_flops(device, DTYPES[config.dtype])
        row["mfu"] = mfu(row["tokens_per_s"], flops_per_token, peak)


def measure(config: Config, rss: RssGauge | None = None) -> dict[str, Any]:
    """The row of `config`, measured in this process."""
    start = time.perf_counter()
    row = base_row(config)
    try:
        _measure(config, row, rss or RssGauge())
    except ConfigError as error:
        row.update(status="skipped", reason=f"ConfigError: {error}")
    except (MemoryError, RuntimeError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if isinstance(error, MemoryError) or any(s in message.lower() for s in OUT_OF_MEMORY):
            reason = f"over memory_cap_mib={config.memory_cap_mib}: {message}"
            if config.cpu_allocator == "retain" and not config.device.startswith(
                "cuda"
            ):  # CUDA caps device memory
                reason += (
                    " (cpu_allocator=retain keeps freed memory in the heap, which fragmentation "
                    "can grow past the cap: raise memory_cap_mib or use cpu_allocator=default)"
                )
            row.update(status="skipped", reason=reason)
        else:
            row.update(status="error", reason=f"{type(error).__name__}: {message}")
    except Exception as error:  # a broken backend must not end the bench: record it and go on
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        row.update(status="error", reason=f"{type(error).__name__}: {message}")
    row["wall_s"] = time.perf_counter() - start
    return row


def run_isolated(config: Config, connection) -> None:
    """Entry point of a fresh worker process: measure and send the row back."""
    rss = RssGauge()
    rss.start()
    _limit_memory(config)
    connection.send(measure(config, rss))
    connection.close()
