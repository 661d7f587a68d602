"""Counting without a clock: LaunchCounter (longctx/ops/launches.py), the host syncs of every
backend's GPU path in a training step, and the bench's `launches` mode (kernel_launches)."""

from __future__ import annotations

import os

import pytest
import torch
from backend_cases import CASES
from conftest import model_config

from longctx import build_model
from longctx.bench.config import Config, settings_from_config
from longctx.bench.launches import count_block_step
from longctx.ops.launches import LaunchCounter, run_opaque
from longctx.ops.seam import TORCH, unavailable_reason

VOCAB = 37
CPU = torch.device("cpu")


def test_the_counter_sees_ops_and_every_kind_of_host_sync():
    x = torch.randn(6, requires_grad=True)
    with LaunchCounter() as counter:
        y = (x * 2).sum()
        y.backward()
    assert counter.host_syncs == 0 and counter.aten_ops >= 4
    with LaunchCounter() as counter:
        y.item()  # _local_scalar_dense
        bool(x[0] > 0)  # _local_scalar_dense
        x.detach()[x.detach() > 0]  # a boolean mask: nonzero inside
        torch.nonzero(x.detach())
    assert counter.host_syncs == 4, dict(counter.ops)


def test_an_opaque_kernel_counts_its_gpu_launches_and_stands_in_for_its_backward():
    x = torch.randn(3, 4, requires_grad=True)
    with LaunchCounter() as counter:
        y = run_opaque(lambda t: t * 3, (x,), forward_launches=1, backward_launches=2)
        y.sum().backward()
    assert counter.opaque_launches == 3
    assert torch.equal(y, x.detach() * 3)
    assert torch.equal(x.grad, torch.zeros_like(x))  # a stand-in: counting only
    assert torch.equal(run_opaque(lambda t: t * 3, (x,), 1, 2), x * 3)  # no counter: just runs


def _gpu_kernel(name: str, options: dict) -> str:
    """The kernel `auto` picks on a GPU: the first the backend lists."""
    backend = build_model(model_config(name, options), VOCAB).backend
    return backend.supported_kernels()[0]


@pytest.mark.parametrize("name", list(CASES))
def test_the_gpu_path_of_every_backend_makes_no_host_sync_in_a_training_step(name):
    """Forward, loss and backward with the backend's GPU kernel, forced on the CPU, counted after
    a first forward filled the per-length caches: no operator waits for the device. Flex's
    forward is counted as the fused kernel it is on a GPU (its BlockMask construction and
    everything around it are counted op by op); its CPU backward is stood in for."""
    case = CASES[name]
    kernel = _gpu_kernel(name, case["options"])
    reason = unavailable_reason(kernel, CPU)
    if reason is not None:
        pytest.skip(f"{name}'s GPU kernel {kernel}: {reason}")
    cfg = model_config(name, {**case["options"], "kernel": kernel}, *case.get("model", ()))
    model = build_model(cfg, VOCAB)
    ids = torch.randint(0, VOCAB, (2, case["seq_len"] + 1))
    with torch.no_grad():
        model(ids[:, :-1])
    with LaunchCounter() as counter:
        logits = model(ids[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
    syncs = {
        op: n
        for op, n in counter.ops.items()
        if op in ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select")
    }
    assert counter.host_syncs == 0, (kernel, syncs)


def _settings(backends: list[str], seq_len: int = 300):
    bench = {
        "lengths": [seq_len],
        "batch": 2,
        "heads": 4,
        "head_dim": 16,
        "repeats": 1,
        "decode_tokens": 1,
        "prefill_chunk": 64,
        "rounds": 1,
        "options": {"sliding_window": {"window": 64}},
        "backends": backends,
        "anchors": [],
        "dtypes": ["fp32"],
        "modes": ["launches"],
        "device": "cpu",
        "warmup": 0,
        "model_size": "tiny",
        "memory_cap_mib": None,
        "threads": None,
        "seed": 0,
        "cpu_allocator": "default",
        "config_budget_s": 60,
        "total_budget_s": 600,
    }
    return settings_from_config(bench, {})


def _config(subject: str, kernel: str) -> Config:
    (config,) = [c for c in _settings([subject]).configs() if c.kernel == kernel]
    return config


def test_launches_mode_counts_every_kernel_a_backend_lists():
    kernels = {(c.subject, c.kernel) for c in _settings(["sliding_window", "linear"]).configs()}
    assert ("sliding_window", "flex") in kernels and ("sliding_window", "torch") in kernels
    assert ("linear", "torch") in kernels


def test_flex_needs_fewer_launches_than_the_cpu_engine_and_no_sync():
    """The block step of sliding_window: Flex (the GPU kernel: fused, counted as 1 + 2 launches)
    against the block-sparse engine (a Python loop over tiles: the CPU kernel)."""
    flex = count_block_step(_config("sliding_window", "flex"))
    engine = count_block_step(_config("sliding_window", TORCH))
    assert flex["opaque_launches"] == 3 and flex["host_syncs"] == 0
    assert engine["opaque_launches"] == 0
    assert flex["kernel_launches"] < engine["kernel_launches"]
    assert flex["kernel_launches"] == flex["aten_ops"] + flex["opaque_launches"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", sorted(CASES))
def test_cuda_training_step_never_waits_for_the_device(name):
    """The same check on a GPU, by CUDA itself: any synchronising call raises."""
    case = CASES[name]
    cfg = model_config(name, case["options"], *case.get("model", ()))
    model = build_model(cfg, VOCAB).cuda()
    ids = torch.randint(0, VOCAB, (2, case["seq_len"] + 1), device="cuda")
    with torch.no_grad():
        model(ids[:, :-1])  # per-length caches, as a run's first step fills them
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        logits = model(ids[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_triton_launches_count_once_each_and_not_the_interpreters_copies():
    """A plain and an autotuned Triton kernel: two launches, and no aten op of the interpreter's
    argument copies (runs where triton can launch here: a GPU, or TRITON_INTERPRET=1)."""
    triton = pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton launches need a GPU or TRITON_INTERPRET=1")
    import triton.language as tl

    @triton.jit
    def plus_one(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < n) + 1, mask=i < n)

    @triton.autotune(configs=[triton.Config({"BLOCK": 16})], key=["n"])
    @triton.jit
    def tuned(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < n) + 1, mask=i < n)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.arange(40.0, device=device)
    y = torch.empty_like(x)
    with LaunchCounter() as counter:
        plus_one[(3,)](x, y, 40, BLOCK=16)
        tuned[(3,)](x, y, 40)
    assert counter.triton_launches == 2 and counter.aten_ops == 0
    assert torch.equal(y, x + 1)
