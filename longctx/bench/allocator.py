"""What the bench worker's C allocator does with freed memory: the `cpu_allocator` setting.

CPU tensors come from the C library's malloc. With glibc's defaults, a block above its mmap
threshold (which adapts, up to 32 MiB) is mapped fresh when allocated and unmapped when freed,
so a call whose tensors pass the threshold page-faults every one of their pages again on every
call: on the 2-core CPU VM about 25 ms per 128 MiB written. Without those faults linear
attention's fwd+bwd at N=64K ran about 20% faster and fla's pure-torch reference at N=16K about
twice as fast (bench, paired rounds). Allocators such as jemalloc or tcmalloc keep freed memory
for reuse instead.

- `default`: malloc as the environment configures it (MALLOC_* variables, GLIBC_TUNABLES).
- `retain`: freed memory stays in the process's heap and is reused by the next call (glibc's
  mmap threshold and trim threshold raised with mallopt). Repeated calls then run mostly on pages
  that are already mapped, and the process keeps its peak footprint. Not always: an aligned
  request as big as a freed block needs a little more than that block, so glibc may place it
  elsewhere, and fragmentation can grow the heap past the peak (aft_local at N=64K ran past
  memory_cap_mib=6144 under `retain`, with a 1.7 GiB allocator peak).

Which one a ratio is measured under can decide it (a kernel with big temporaries gains the most
from `retain`), so the setting is stored with every row.
"""

from __future__ import annotations

import ctypes

from longctx.errors import ConfigError

CPU_ALLOCATORS = ("default", "retain")

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Blocks up to 1 GiB come from the heap, and the heap's top is returned to the OS only past 2 GiB
# free: together no block a bench configuration uses is unmapped between its calls.
RETAIN_MMAP_THRESHOLD = 1 << 30
RETAIN_TRIM_THRESHOLD = (1 << 31) - 1


def _mallopt():
    """glibc's mallopt from the C library this process runs on, or None (e.g. musl)."""
    return getattr(ctypes.CDLL(None), "mallopt", None)


def check_cpu_allocator(name: str) -> str:
    """`name` if this process can apply it; a ConfigError naming the fix otherwise."""
    if name not in CPU_ALLOCATORS:
        raise ConfigError(
            f"cpu_allocator={name!r} is not valid; choose from {list(CPU_ALLOCATORS)}"
        )
    if name == "retain" and _mallopt() is None:
        raise ConfigError(
            "cpu_allocator=retain needs glibc's mallopt, which this C library lacks; "
            "use cpu_allocator=default"
        )
    return name


def configure_cpu_allocator(name: str) -> None:
    """Apply `cpu_allocator=name` to this process, before the workload allocates."""
    if check_cpu_allocator(name) == "default":
        return
    mallopt = _mallopt()
    for parameter, value in (
        (M_MMAP_THRESHOLD, RETAIN_MMAP_THRESHOLD),
        (M_TRIM_THRESHOLD, RETAIN_TRIM_THRESHOLD),
    ):
        if mallopt(ctypes.c_int(parameter), ctypes.c_int(value)) != 1:
            raise ConfigError(
                f"cpu_allocator=retain: this C library refused mallopt({parameter}, {value}); "
                "use cpu_allocator=default"
            )
