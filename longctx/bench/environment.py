"""Where the figures come from: software, hardware, load and code version, stored with them."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    """HEAD, with '+dirty' when the working tree differs from it (None outside a checkout)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def load_average() -> list[float] | None:
    """1/5/15-minute load: other work on the machine shows here and disturbs the timings."""
    try:
        return list(os.getloadavg())
    except OSError:
        return None


# Besides glibc's own settings and a preloaded allocator (jemalloc, tcmalloc): PyTorch's
# THP_MEM_ALLOC_ENABLE, which aligns CPU tensors of 2 MiB and more to huge pages and asks the
# kernel for them. It moves times a lot here: linear attention's fwd+bwd at N=4K went from 42 to
# 69-76 ms under cpu_allocator=default, at 16K from 203 to 179-190 ms.
ALLOCATOR_VARIABLES = ("GLIBC_TUNABLES", "LD_PRELOAD", "THP_MEM_ALLOC_ENABLE")
TRANSPARENT_HUGEPAGE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def allocator_environment() -> dict[str, str]:
    """Variables that change what cpu_allocator=default means."""
    return {
        key: value
        for key, value in os.environ.items()
        if key.startswith("MALLOC_") or key in ALLOCATOR_VARIABLES
    }


def transparent_hugepage_mode() -> str | None:
    """The kernel's transparent huge page policy (always, madvise or never; None off Linux): the
    cost of a page fault, which decides what a freed-and-refaulted tensor costs, depends on it."""
    try:
        modes = TRANSPARENT_HUGEPAGE.read_text().split()
    except OSError:
        return None
    return next((mode.strip("[]") for mode in modes if mode.startswith("[")), None)


def describe(device: str, threads: int | None) -> dict:
    on_gpu = device.startswith("cuda")
    return {
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": threads or torch.get_num_threads(),
        "allocator_env": allocator_environment(),
        "transparent_hugepage": transparent_hugepage_mode(),
        "device": device,
        "device_name": torch.cuda.get_device_name(torch.device(device)) if on_gpu else cpu_model(),
        "cuda": torch.version.cuda if on_gpu else None,
        "git_commit": git_commit(),
        "load_average_start": load_average(),
        "command": " ".join(sys.argv),
    }
