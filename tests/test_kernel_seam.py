"""`attention.kernel`: the seam that picks each backend's implementation (longctx/ops/seam.py).

Every kernel a backend lists is forced through the config on the CPU (wherever it can run there:
FlexAttention's compiled forward, fla's kernels under TRITON_INTERPRET=1) and held equal to the
backend's torch kernel; the attention layer holds no device test of its own.
"""

from __future__ import annotations

import ast

import pytest
import torch
from backend_cases import CASES
from conftest import ROOT, model_config
from torch.utils._python_dispatch import TorchDispatchMode

from longctx import build_model
from longctx.attention import backend_class
from longctx.errors import ConfigError
from longctx.ops.seam import (
    AUTO,
    FLA,
    FLEX,
    TORCH,
    TORCH_FLOOR,
    resolve_kernel,
    torch_version,
    unavailable_reason,
)
from longctx.ops.softmax.flex import TILE, bucket

CPU = torch.device("cpu")
VOCAB = 37
# Batch, heads and a length whose Flex bucket the kernel tests of test_sparse.py also use, so
# the compiled kernels are shared.
BATCH, SEQ = 2, 300


def test_auto_is_the_torch_kernel_off_cuda():
    assert resolve_kernel(AUTO, (FLEX, TORCH), CPU) == TORCH
    assert resolve_kernel(AUTO, (FLA, TORCH), CPU) == TORCH


def test_a_kernel_the_backend_lacks_is_refused_at_config_time():
    with pytest.raises(ConfigError, match=r"attention=full has no kernel 'nonsense'.*auto"):
        build_model(model_config("full", {"kernel": "nonsense"}), 11)


def test_fla_forced_without_cuda_or_the_interpreter_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="kernel=fla cannot run on cpu"):
        resolve_kernel(FLA, (FLA, TORCH), CPU)


def test_aft_conv_keeps_its_integer_kernel_length_beside_the_implementation_name():
    by_length = build_model(model_config("aft_conv", {"kernel": 5}), 11)
    assert by_length.backend.options.kernel == 5 and by_length.backend.kernel == AUTO
    by_name = build_model(model_config("aft_conv", {"kernel": "torch"}), 11)
    assert by_name.backend.options.kernel == 64 and by_name.backend.kernel == TORCH


def _logits(name: str, kernel: str, *overrides: str) -> torch.Tensor:
    case = CASES[name]
    cfg = model_config(name, {**case["options"], "kernel": kernel}, *overrides)
    cfg.context_length = max(cfg.context_length, SEQ)
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB).eval()
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids)


def _kernels(name: str) -> tuple[str, ...]:
    case = CASES[name]
    return build_model(model_config(name, case["options"]), VOCAB).backend.supported_kernels()


# Backends with a kernel besides torch (hybrid: through its parts).
SEVERAL_KERNELS = [n for n in sorted(CASES) if len(backend_class(n).kernels) > 1 or n == "hybrid"]


@pytest.mark.parametrize("name", SEVERAL_KERNELS)
def test_every_kernel_forced_through_the_config_equals_the_torch_kernel(name):
    """attention.kernel=<each kernel the backend lists> runs here and gives the torch kernel's
    logits (fp32): the compiled CPU Flex forward for the softmax backends, fla's kernels where
    triton's interpreter is on; a kernel that cannot run here is skipped with its reason."""
    reference = _logits(name, TORCH)
    skipped = []
    for kernel in _kernels(name):
        reason = unavailable_reason(kernel, CPU)
        if reason is not None:
            skipped.append(f"{kernel}: {reason}")
            continue
        torch.testing.assert_close(_logits(name, kernel), reference, rtol=1e-5, atol=1e-5)
    if skipped:
        pytest.skip("; ".join(skipped))


def test_full_with_alibi_through_flex_equals_the_torch_kernel():
    """ALiBi as Flex's score_mod against the torch kernel (the engine's per-tile bias)."""
    alibi = "model.position=alibi"
    torch.testing.assert_close(
        _logits("full", FLEX, alibi), _logits("full", TORCH, alibi), rtol=1e-5, atol=1e-5
    )


class _LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an operator returned while active."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_full_with_alibi_never_builds_a_dense_bias():
    """The torch kernel of full + ALiBi (training, forward and backward) creates no tensor of
    N x N elements: the bias is applied per tile by the block-sparse engine."""
    n = 1024
    cfg = model_config("full", {"kernel": TORCH}, "model.position=alibi", f"context_length={n}")
    model = build_model(cfg, VOCAB)
    ids = torch.randint(0, VOCAB, (1, n))
    with _LargestTensor() as watch:
        model(ids).logsumexp(-1).mean().backward()
    assert watch.largest < n * n, watch.largest


def _device_tests(path) -> list[str]:
    """`x.is_cuda` and comparisons of `x.device.type` in a source file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr == "is_cuda":
            found.append(f"{path.name}:{node.lineno} is_cuda")
        if isinstance(node, ast.Compare):
            for side in (node.left, *node.comparators):
                if (
                    isinstance(side, ast.Attribute)
                    and side.attr == "type"
                    and isinstance(side.value, ast.Attribute)
                    and side.value.attr == "device"
                ):
                    found.append(f"{path.name}:{node.lineno} device.type")
    return found


# The seam itself decides by device; moba's torch kernel picks which aten attention op exists on
# the device its tensors are on (the fused CPU flash kernel or a plain matmul form).
DEVICE_TESTS_ALLOWED = {"seam.py", "engine.py"}


def test_no_device_test_outside_the_seam():
    found = []
    for path in sorted((ROOT / "longctx" / "attention").glob("*.py")):
        found += _device_tests(path)
    for path in sorted((ROOT / "longctx" / "ops").rglob("*.py")):
        if path.name not in DEVICE_TESTS_ALLOWED or (
            path.name == "engine.py" and path.parent.name != "moba"
        ):
            found += _device_tests(path)
    assert not found, found


def test_hybrid_accepts_any_kernel_of_its_parts_and_passes_it_on():
    cfg = model_config(
        "hybrid", {**CASES["hybrid"]["options"], "kernel": FLEX}, "context_length=64"
    )
    backend = build_model(cfg, VOCAB).backend
    assert FLEX in backend.supported_kernels() and TORCH in backend.supported_kernels()
    assert backend.parts["sliding_window"].kernel == FLEX
    assert backend.parts["linear"].kernel == AUTO  # linear has no Flex kernel: it picks its own
    with pytest.raises(ConfigError, match="no kernel 'fla'"):
        only_softmax = {"pattern": ["full", "sliding_window"], "backends": {}, "kernel": FLA}
        build_model(model_config("hybrid", only_softmax), VOCAB)


def test_every_backend_lists_torch_its_cpu_kernel():
    for name in CASES:
        assert TORCH in backend_class(name).kernels


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("position", ["rope", "alibi"])
@pytest.mark.parametrize("name", SEVERAL_KERNELS)
def test_cuda_auto_kernel_trains_like_the_torch_kernel(name, position):
    """On a GPU, `auto` (Flex, fla) against the torch kernel: logits and every weight's gradient
    of one training step, fp32 (TF32 off)."""
    if name == "transformer_xl" and position == "alibi":
        pytest.skip("transformer_xl refuses ALiBi")
    torch.backends.cuda.matmul.allow_tf32 = False
    results = []
    for kernel in (AUTO, TORCH):
        case = CASES[name]
        cfg = model_config(
            name, {**case["options"], "kernel": kernel}, f"model.position={position}"
        )
        cfg.context_length = max(cfg.context_length, SEQ)
        torch.manual_seed(0)
        model = build_model(cfg, VOCAB).cuda()
        ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
        ids = ids.cuda()
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        results.append([logits.detach()] + [p.grad for p in model.parameters()])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)


def test_the_torch_floor_is_stated_once_and_met():
    """pyproject.toml requires the floor the seam states, and this torch meets it (on an older
    torch this test fails, as the Flex kernels would)."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    floor = ".".join(map(str, TORCH_FLOOR))
    assert f'"torch>={floor}"' in pyproject
    assert torch_version() >= TORCH_FLOOR, f"torch {torch.__version__} is older than {floor}"
    assert unavailable_reason(FLEX, CPU) is None


def test_lengths_share_a_few_buckets_per_octave():
    """Flex kernels are compiled per padded length: at most 8 sizes per octave, whole tiles, and
    never more than an eighth of padding beyond the last tile."""
    sizes = [bucket(n) for n in range(1, 1 << 16)]
    assert all(s % TILE == 0 and s >= n for n, s in zip(range(1, 1 << 16), sizes))
    for octave in range(7, 16):
        assert len({s for s in sizes if (1 << octave) < s <= (1 << (octave + 1))}) <= 8
    assert all(s - n < TILE + n / 8 for n, s in zip(range(1, 1 << 16), sizes))


def test_reaching_the_recompile_limit_raises_instead_of_running_unfused(monkeypatch):
    """Past the limit dynamo would run Flex eagerly (N x N scores) without a word: it raises."""
    from longctx.ops.softmax import flex as softmax_flex

    monkeypatch.setattr(softmax_flex, "RECOMPILE_LIMIT", 1)
    torch._dynamo.reset()
    pattern = build_model(model_config("sliding_window", {"window": 4}), VOCAB).blocks[0]
    core = pattern.mixer.core
    core.kernel = FLEX
    q = torch.randn(1, 4, 100, 16)
    with torch.no_grad():
        core(q, q, q, None)  # the first compiled kernel
        with pytest.raises(Exception, match="(?i)recompil"):
            q2 = torch.randn(1, 4, 200, 16)  # another bucket: a second kernel, past the limit
            core(q2, q2, q2, None)
    torch._dynamo.reset()
