"""memory_compressed: the fast layers against dense references, receptive fields,
streaming state."""

from __future__ import annotations

import pytest
import torch
from backend_references import memory_compressed_layer_reference as dense_reference
from conftest import model_config
from probes import receptive_field

from longctx import build_model
from longctx.attention import ModelSettings, build_backend
from longctx.attention.memory_compressed import (
    QUERY_CHUNK,
    BlockLocalCore,
    MemoryCompressedAttention,
    compressed_attention,
)
from longctx.core.positions import alibi_slopes
from longctx.errors import ConfigError
from longctx.ops.sparse.reference import reference_attention

VOCAB = 37


def _dims(position: str = "rope", n_layer: int = 1) -> ModelSettings:
    return ModelSettings(
        n_layer=n_layer, n_head=4, d_model=32, context_length=1024, position=position
    )


def _mixer(
    compression: int, position: str = "rope", dtype=torch.float64, seed: int = 0
) -> MemoryCompressedAttention:
    torch.manual_seed(seed)
    backend = build_backend(
        {"name": "memory_compressed", "compression": compression, "alternate": False},
        _dims(position),
    )
    mixer = backend.mixer(0).to(dtype)
    # The default init is mean pooling, a special case that would hide a wrong tap order.
    with torch.no_grad():
        for conv in (mixer.compress_k, mixer.compress_v):
            conv.weight.normal_(std=0.1)
    return mixer


@pytest.mark.parametrize("position", ["rope", "alibi", "none"])
@pytest.mark.parametrize(
    "compression,n", [(3, 1), (3, 2), (3, 3), (3, 10), (3, 37), (4, 23), (5, 40)]
)
def test_forward_and_input_gradient_equal_the_dense_reference(compression, n, position):
    mixer = _mixer(compression, position)
    x = torch.randn(2, n, 32, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, n, 32, dtype=torch.float64)
    fast = mixer(x)
    (grad_fast,) = torch.autograd.grad((fast * weights).sum(), x)
    reference = dense_reference(mixer, x)
    (grad_reference,) = torch.autograd.grad((reference * weights).sum(), x)
    torch.testing.assert_close(fast, reference, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad_fast, grad_reference, rtol=1e-10, atol=1e-10)


def test_several_query_chunks_equal_the_dense_reference():
    n = 2 * QUERY_CHUNK + 41  # the last chunk is partial and starts mid-block
    mixer = _mixer(3)
    x = torch.randn(1, n, 32, dtype=torch.float64, requires_grad=True)
    fast = mixer(x)
    (grad_fast,) = torch.autograd.grad(fast.sum(), x)
    reference = dense_reference(mixer, x)
    (grad_reference,) = torch.autograd.grad(reference.sum(), x)
    torch.testing.assert_close(fast, reference, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad_fast, grad_reference, rtol=1e-10, atol=1e-10)


def test_the_reference_tells_the_slot_rule_apart():
    """A slot seen only once its block has ended *before* i would differ at block ends: the
    equality above pins "ends at or before i"."""
    mixer = _mixer(3)
    x = torch.randn(1, 12, 32, dtype=torch.float64)
    strict = dense_reference(mixer, x, slot_visible=lambda end, i: end < i)
    fast = mixer(x)
    block_ends = torch.arange(2, 12, 3)
    others = torch.tensor([p for p in range(12) if p % 3 != 2])
    assert (fast[:, block_ends] - strict[:, block_ends]).abs().amin(-1).gt(1e-6).all()
    torch.testing.assert_close(fast[:, others], strict[:, others], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_low_precision_is_close_to_fp64(dtype, tolerance):
    """fp32 to 1e-5; bf16 (inputs, weights and kernels in bf16) to 3e-2 of the output scale."""
    mixer = _mixer(3)
    x = torch.randn(2, 300, 32, dtype=torch.float64)
    reference = mixer(x)
    low = mixer.to(dtype)(x.to(dtype)).double()
    scale = reference.abs().max()
    assert (low - reference).abs().max() <= tolerance * scale


def _one_layer_model(options: dict, dtype=torch.float64):
    cfg = model_config("memory_compressed", options, "model.n_layer=1")
    torch.manual_seed(0)
    return build_model(cfg, VOCAB).to(dtype).eval()


@pytest.mark.parametrize("compression,n", [(3, 20), (4, 23), (3, 18)])
def test_one_compressed_layer_sees_exactly_the_past(compression, n):
    """alternate: false, one layer: every j <= i reaches i (raw block or slot), no j > i does,
    including at block ends and in a trailing incomplete block."""
    model = _one_layer_model({"compression": compression, "alternate": False})
    pos = torch.arange(n)
    assert torch.equal(receptive_field(model, n), pos[None, :] <= pos[:, None])


def test_one_local_layer_sees_its_block_only():
    """alternate: true starts with a local layer: floor(j/b) == floor(i/b), j <= i."""
    model = _one_layer_model({"block_size": 5, "alternate": True})
    n, pos = 17, torch.arange(17)
    expected = (pos[None, :] // 5 == pos[:, None] // 5) & (pos[None, :] <= pos[:, None])
    assert torch.equal(receptive_field(model, n), expected)


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_block_local_core_equals_the_pattern_reference(position):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 29, 8, dtype=torch.float64) for _ in range(3))
    slopes = alibi_slopes(4).double() if position == "alibi" else None
    fast = BlockLocalCore(6)(q, k, v, slopes)
    reference = reference_attention(q, k, v, lambda h, i, j: i // 6 == j // 6, slopes)
    torch.testing.assert_close(fast, reference, rtol=1e-10, atol=1e-10)


def test_layers_alternate_local_and_compressed():
    for alternate, expected in ((True, "LMLML"), (False, "MMMMM")):
        cfg = model_config("memory_compressed", {"alternate": alternate}, "model.n_layer=5")
        model = build_model(cfg, VOCAB)
        kinds = "".join(
            "M" if isinstance(b.mixer, MemoryCompressedAttention) else "L" for b in model.blocks
        )
        assert kinds == expected
        local = [
            b.mixer.core for b in model.blocks if not isinstance(b.mixer, MemoryCompressedAttention)
        ]
        assert all(isinstance(core, BlockLocalCore) and core.block_size == 256 for core in local)


def test_streaming_state_is_the_pending_block_plus_one_slot_per_block():
    mixer = _mixer(3, dtype=torch.float32)
    state, seen = mixer.init_state(2), 0
    with torch.no_grad():
        for n in (1, 4, 5, 11, 2):
            _, state = mixer.step(torch.randn(2, n, 32), state, seen)
            seen += n
            assert state["slot_k"].shape[2] == state["slot_v"].shape[2] == seen // 3
            assert state["k"].shape[2] == state["v"].shape[2] == seen % 3


def test_project_refuses_an_unaligned_start():
    with pytest.raises(ValueError, match="block-aligned"):
        _mixer(3).project(torch.randn(1, 6, 32, dtype=torch.float64), start=2)


def test_compressed_attention_needs_no_complete_block():
    """Queries before the first block end see their raw block only (no null key is needed)."""
    q, k, v = (torch.randn(1, 2, 2, 4, dtype=torch.float64) for _ in range(3))
    empty = k[:, :, :0]
    o = compressed_attention(q, k, v, empty, empty, 0, 3, None)
    reference = reference_attention(q, k, v, lambda h, i, j: j <= i)
    torch.testing.assert_close(o, reference, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"compression": 1}, "compression"),
        ({"block_size": 0}, "block_size"),
        ({"alternate": "yes"}, "alternate"),
    ],
)
def test_impossible_options_are_refused_at_build_time(options, message):
    with pytest.raises(ConfigError, match=message):
        build_model(model_config("memory_compressed", options), VOCAB)


@pytest.mark.parametrize("alternate", [True, False])
def test_attention_flops_count_the_allowed_pairs(alternate):
    n, k, b = 50, 3, 8
    backend = build_backend(
        {"name": "memory_compressed", "compression": k, "block_size": b, "alternate": alternate},
        _dims(n_layer=3),
    )
    i = torch.arange(n)[:, None]
    compressed = ((torch.arange(n)[None] // k == i // k) & (torch.arange(n)[None] <= i)).sum() + (
        (torch.arange(n // k)[None] * k + k - 1) <= i
    ).sum()
    local = ((torch.arange(n)[None] // b == i // b) & (torch.arange(n)[None] <= i)).sum()
    pairs = (2 * local + compressed) / 3 if alternate else compressed
    assert backend.attention_flops(n) == pytest.approx(float(4 * pairs * 32))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    mixer = _mixer(3, dtype=torch.float32)
    x = torch.randn(2, 300, 32)
    expected = mixer(x)
    torch.testing.assert_close(mixer.cuda()(x.cuda()).cpu(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layer", [0, 1])
def test_mix_takes_the_projections_as_they_come(layer):
    """mix(*project(x)) on a model without positions (as forward uses it): permuted, non-contiguous
    q/k/v, and whole blocks (no padding copy) must work for both layer kinds."""
    torch.manual_seed(0)
    backend = build_backend({"name": "memory_compressed", "block_size": 8}, _dims("none"))
    mixer = backend.mixer(layer).double()
    x = torch.randn(2, 48, 32, dtype=torch.float64)
    o = mixer.mix(*(t.detach() for t in mixer.project(x)))
    torch.testing.assert_close(
        mixer.out(o.transpose(1, 2).reshape(2, 48, 32)), mixer(x), rtol=0, atol=0
    )
