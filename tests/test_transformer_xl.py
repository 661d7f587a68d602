"""transformer_xl: relative shift, a dense per-pair reference, receptive field, memory semantics."""

from __future__ import annotations

import pytest
import torch
from backend_references import transformer_xl_layer_reference as dense_reference
from conftest import model_config
from probes import receptive_field

from longctx import build_model
from longctx.attention import ModelSettings, backend_class, build_backend
from longctx.attention.transformer_xl import (
    TransformerXLAttention,
    memory_length,
    relative_shift,
)
from longctx.errors import ConfigError
from longctx.ops import pieces

VOCAB = 37


def _mixer(
    segment_length: int, mem_len: int, dtype=torch.float64, seed: int = 0
) -> TransformerXLAttention:
    torch.manual_seed(seed)
    dims = ModelSettings(n_layer=1, n_head=4, d_model=32, context_length=1024)
    backend = build_backend(
        {"name": "transformer_xl", "segment_length": segment_length, "mem_len": mem_len}, dims
    )
    return backend.mixer(0).to(dtype)


def test_relative_shift_equals_an_explicit_gather():
    """shifted[r, j] = raw[r, column of distance K-l+r-j] wherever j <= K-l+r."""
    torch.manual_seed(0)
    for qlen, klen in ((5, 5), (5, 12), (1, 7), (8, 8 + 11)):
        raw = torch.randn(2, 3, qlen, klen)  # scores against distances klen-1 .. 0
        shifted = relative_shift(raw)
        for r in range(qlen):
            for j in range(klen - qlen + r + 1):
                distance = klen - qlen + r - j
                assert shifted[:, :, r, j].equal(raw[:, :, r, klen - 1 - distance])


@pytest.mark.parametrize(
    "seg,mem,n", [(5, 7, 23), (5, 3, 23), (8, 0, 19), (4, 4, 4), (6, 30, 25), (7, 5, 3)]
)
def test_forward_and_input_gradient_equal_the_dense_reference(seg, mem, n):
    mixer = _mixer(seg, mem)
    x = torch.randn(2, n, 32, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, n, 32, dtype=torch.float64)
    fast = mixer(x)
    fast_grads = torch.autograd.grad((fast * weights).sum(), [x, *mixer.parameters()])
    reference = dense_reference(mixer, x)
    reference_grads = torch.autograd.grad((reference * weights).sum(), [x, *mixer.parameters()])
    torch.testing.assert_close(fast, reference, rtol=1e-10, atol=1e-10)
    for fast_grad, reference_grad in zip(fast_grads, reference_grads):
        torch.testing.assert_close(fast_grad, reference_grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("segments_per_group", [1, 2])
def test_grouped_segments_equal_the_dense_reference(segments_per_group, monkeypatch):
    """mix scores a few segments at a time on long inputs:
    groups (and a short last one) change nothing."""
    mixer = _mixer(4, 6)
    monkeypatch.setattr(pieces, "TRANSIENT_SCORES", segments_per_group * 2 * 4 * 4 * (6 + 4))
    x = torch.randn(2, 19, 32, dtype=torch.float64, requires_grad=True)
    fast = mixer(x)
    (grad_fast,) = torch.autograd.grad(fast.sum(), x)
    reference = dense_reference(mixer, x)
    (grad_reference,) = torch.autograd.grad(reference.sum(), x)
    torch.testing.assert_close(fast, reference, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad_fast, grad_reference, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("seg,mem", [(8, 11), (5, 2)])
def test_streaming_any_chunks_equals_forward_with_gradients(seg, mem):
    """step, in whole segments or not, equals forward, input and weight gradients included."""
    mixer = _mixer(seg, mem)
    x = torch.randn(2, 29, 32, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 29, 32, dtype=torch.float64)
    reference = mixer(x)
    reference_grads = torch.autograd.grad((reference * weights).sum(), [x, *mixer.parameters()])
    for chunks in ([seg] * (29 // seg) + [29 % seg], [3, 1, 9, 16]):
        state, outputs, start = mixer.init_state(2), [], 0
        for size in chunks:
            y, state = mixer.step(x[:, start : start + size], state, start)
            outputs.append(y)
            start += size
        streamed = torch.cat(outputs, 1)
        grads = torch.autograd.grad((streamed * weights).sum(), [x, *mixer.parameters()])
        torch.testing.assert_close(streamed, reference, rtol=1e-10, atol=1e-10)
        for grad, reference_grad in zip(grads, reference_grads):
            torch.testing.assert_close(grad, reference_grad, rtol=1e-10, atol=1e-10)


def _model(options: dict, *overrides: str, dtype=torch.float64, seed: int = 0):
    cfg = model_config("transformer_xl", options, *overrides)
    torch.manual_seed(seed)
    return build_model(cfg, VOCAB).to(dtype).eval()


def _ids(n: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("seg,mem", [(5, 7), (5, 3), (4, 0)])
def test_one_layer_receptive_field_is_memory_plus_offset(seg, mem):
    """Logits at i change with token j exactly when j <= i and i - j <= mem_len + (i mod L)."""
    model = _model({"segment_length": seg, "mem_len": mem}, "model.n_layer=1").eval()
    n = 21
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    assert torch.equal(receptive_field(model, n), (j <= i) & (i - j <= mem + i % seg))


def test_gradient_stops_at_the_memory():
    """However deep the model, a segment's loss sends no gradient into earlier segments' inputs,
    although their values do reach it through the memory."""
    model = _model({"segment_length": 6, "mem_len": 6}, "model.n_layer=3")
    captured = {}

    def keep_embeddings(module, inputs, output):
        output.retain_grad()
        captured["x"] = output

    hook = model.embed.register_forward_hook(keep_embeddings)
    ids = _ids(18)
    logits = model(ids)
    hook.remove()
    logits[:, 12:].sum().backward()
    grad = captured["x"].grad
    assert grad[:, :12].abs().max() == 0 and grad[:, 12:].abs().min() > 0
    changed = ids.clone()
    changed[:, 8] = (changed[:, 8] + 1) % VOCAB
    with torch.no_grad():
        assert not torch.allclose(model(changed)[:, 12:], logits[:, 12:])


def test_empty_or_masked_memory_is_no_memory():
    """The first segment of forward (memory slots masked), a step from an empty memory and a model
    whose memory is switched off give the same logits (x-transformers #223/#242)."""
    model = _model({"segment_length": 8, "mem_len": 5})
    ids = _ids(8)
    with torch.no_grad():
        masked = model(ids)
        empty, _ = model.step(ids, model.init_state(2))
        with memory_length(model, 0):
            without = model(ids)
    torch.testing.assert_close(masked, without, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(empty, without, rtol=1e-12, atol=1e-12)


def test_without_memory_segments_are_independent():
    model = _model({"segment_length": 8, "mem_len": 0})
    ids = _ids(27)
    with torch.no_grad():
        whole = model(ids)
        alone = torch.cat([model(ids[:, s : s + 8]) for s in range(0, 27, 8)], 1)
    torch.testing.assert_close(whole, alone, rtol=1e-12, atol=1e-12)


def test_eval_may_use_a_longer_memory_with_the_same_weights():
    short = _model({"segment_length": 4, "mem_len": 2})
    long = _model({"segment_length": 4, "mem_len": 9}, seed=1)
    long.load_state_dict(short.state_dict(), strict=True)
    ids = _ids(23)
    with torch.no_grad():
        expected = long(ids)
        with memory_length(short, 9):
            torch.testing.assert_close(short(ids), expected, rtol=1e-12, atol=1e-12)
        assert not torch.allclose(short(ids), expected)  # mem_len is back to 2


def test_rope_and_none_both_mean_relative_positions_only():
    ids = _ids(20)
    with torch.no_grad():
        rope = _model({"segment_length": 8, "mem_len": 8}, "model.position=rope")(ids)
        none = _model({"segment_length": 8, "mem_len": 8}, "model.position=none")(ids)
    assert torch.equal(rope, none)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_low_precision_is_close_to_fp64(dtype, tolerance):
    """fp32 to 1e-5;
    bf16 (inputs, weights and kernels in bf16, softmax in fp32) to 3e-2 of the output scale."""
    mixer = _mixer(16, 24)
    x = torch.randn(2, 70, 32, dtype=torch.float64)
    reference = mixer(x)
    low = mixer.to(dtype)(x.to(dtype)).double()
    assert (low - reference).abs().max() <= tolerance * reference.abs().max()


def test_step_refuses_a_state_from_another_position():
    mixer = _mixer(4, 4)
    state = mixer.init_state(1)
    with pytest.raises(ValueError, match="offset"):
        mixer.step(torch.randn(1, 2, 32, dtype=torch.float64), state, 5)


@pytest.mark.parametrize(
    "options,overrides,message",
    [
        ({}, ["model.position=alibi"], "model.position=rope"),
        ({}, ["model.position=learned"], "model.position=rope"),
        ({"segment_length": 0}, [], "segment_length"),
        ({"mem_len": -1}, [], "mem_len"),
    ],
)
def test_impossible_settings_are_refused_at_build_time(options, overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_model(model_config("transformer_xl", options, *overrides), VOCAB)


def test_trains_on_ordered_streams():
    assert backend_class("transformer_xl").ordered_stream


def test_attention_flops_count_the_work():
    seg, mem, n, d = 5, 7, 23, 32
    dims = ModelSettings(n_layer=2, n_head=4, d_model=d, context_length=n)
    backend = build_backend({"name": "transformer_xl", "segment_length": seg, "mem_len": mem}, dims)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    pairs = ((j <= i) & (i - j <= mem + i % seg)).sum()
    # The position term covers each query's whole row: the segment's memory and the segment.
    rows = sum(
        min(mem, s) + min(seg, n - s) for s in range(0, n, seg) for _ in range(min(seg, n - s))
    )
    assert backend.attention_flops(n) == pytest.approx(float(4 * pairs * d + 2 * rows * d))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    mixer = _mixer(16, 24, dtype=torch.float32)
    x = torch.randn(2, 70, 32)
    expected = mixer(x)
    torch.testing.assert_close(mixer.cuda()(x.cuda()).cpu(), expected, rtol=1e-4, atol=1e-4)


def test_mix_takes_the_projections_as_they_come():
    """mix(*project(x)) with whole segments (no padding copy), as forward uses it:
    non-contiguous inputs work."""
    mixer = _mixer(8, 8)
    x = torch.randn(2, 32, 32, dtype=torch.float64)
    o = mixer.mix(*(t.detach() for t in mixer.project(x)))
    torch.testing.assert_close(
        mixer.out(o.transpose(1, 2).reshape(2, 32, 32)), mixer(x), rtol=0, atol=0
    )
