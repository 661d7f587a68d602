"""How many positions a torch kernel processes in one pass: all of them, or capped segments in
host memory.

The chunk-parallel torch kernels (linear, wkv) can run a long sequence as segments with the state
carried from one to the next; the results are the same either way (tests/test_linear_family.py
holds them equal). Segments change only where memory comes from. In host memory glibc's malloc
unmaps every freed block above its mmap threshold (adaptive, at most 32 MiB), so a call whose
tensors pass it page-faults them afresh on every call; segments whose tensors stay under a cap
run on heap memory that is reused (what that costs and saves: docs/results/bench_cpu/
LOG.md, campaign 4, "What each call page-faults"). A caching device allocator (CUDA's) keeps freed
blocks for reuse, so there segments would only add sequential launches: one pass.
"""

from __future__ import annotations

import torch


def caps_segments(device: torch.device) -> bool:
    """True where freed large blocks go back to the OS (host memory under malloc)."""
    return device.type == "cpu"


def segment_length(
    n: int, per_position: int, chunk: int, cap_elements: int, device: torch.device
) -> int:
    """Positions per segment, a whole number of chunks: all n where memory is cached, otherwise
    equal segments, as few as keep `per_position` x length within `cap_elements`."""
    if not caps_segments(device):
        return -(-max(n, 1) // chunk) * chunk
    longest = max(1, cap_elements // per_position // chunk) * chunk
    count = -(-n // longest)
    return -(-n // count // chunk) * chunk if count > 1 else longest
