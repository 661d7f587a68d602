"""The sparse softmax family (sliding_window, local, dilated, longformer, sparse_strided,
sparse_fixed, blockwise) against docs/attention.md.

The spec predicates are re-written here in plain Python, independently of
longctx/ops/sparse/patterns.py, and every check compares against them: the pattern
predicate itself, the block-sparse engine (outputs and dq, dk, dv against the dense reference,
fp64 / fp32 / bf16, with and without ALiBi), exact causality of the core, the one-layer
receptive field by perturbation, the exact streaming cache, FLOP counts, the FlexAttention
block layout, and config validation.

bf16 tolerance: outputs and gradients within 5e-2 absolute + 2e-2 relative of the fp32 reference
on the same bf16 inputs (measured max error about 2.5e-2 for values up to ~6, i.e. a few bf16
ulps: probabilities are cast to bf16 for the value matmuls, statistics stay fp32).
"""

from __future__ import annotations

import pytest
import torch
from conftest import model_config
from probes import changed_outputs, receptive_field

from longctx import build_model
from longctx.attention import ModelSettings, build_backend
from longctx.attention.sparse_core import SparseCore
from longctx.errors import ConfigError
from longctx.ops import pieces
from longctx.ops.softmax import flex as softmax_flex
from longctx.ops.softmax.flex import TILE
from longctx.ops.softmax.masked import pattern_mask
from longctx.ops.sparse import engine as sparse_engine
from longctx.ops.sparse.flex import tile_counts, tile_grids
from longctx.ops.sparse.patterns import component_parts
from longctx.ops.sparse.reference import reference_attention

N_HEAD, N_LAYER, HEAD_DIM = 4, 2, 16
SEQ = 53  # a multiple of no window, block, stride or engine tile below; >= 4x the largest reach
VOCAB = 37

# Small settings per backend and layout: (backend, options), reach <= 13 positions.
CONFIGS = [
    ("sliding_window", {"window": 5}),
    ("sliding_window", {"window": 1}),
    ("local", {"block_size": 6, "look_back": 1}),
    ("local", {"block_size": 5, "look_back": 0}),
    ("dilated", {"window": 4, "dilation": 3}),
    (
        "longformer",
        {
            "window": 4,
            "dilation": 2,
            "dilated_heads": 2,
            "global_tokens": 3,
            "layer_windows": [3, 5],
        },
    ),
    (
        "longformer",
        {"window": 3, "dilation": 3, "dilated_heads": 4, "global_tokens": 0, "layer_windows": None},
    ),
    (
        "longformer",
        {"window": 4, "dilation": 2, "dilated_heads": 0, "global_tokens": 2, "layer_windows": None},
    ),
    ("sparse_strided", {"stride": 5, "layout": "heads"}),
    ("sparse_strided", {"stride": 5, "layout": "union"}),
    ("sparse_strided", {"stride": 4, "layout": "layers"}),
    ("sparse_fixed", {"stride": 8, "summary": 3, "layout": "heads"}),
    ("sparse_fixed", {"stride": 8, "summary": 3, "layout": "union"}),
    ("sparse_fixed", {"stride": 6, "summary": 2, "layout": "layers"}),
    ("blockwise", {"block_size": 6, "shifts": [0, 1]}),
    ("blockwise", {"block_size": 5, "shifts": [0, 1, 2, 3]}),
]
IDS = [f"{name}-" + "-".join(f"{k}={v}" for k, v in options.items()) for name, options in CONFIGS]


def spec_allowed(
    name: str, o: dict, h: int, i: int, j: int, layer: int = 0, n_head: int = N_HEAD
) -> bool:
    """docs/attention.md, "Softmax over a sparse pattern", for one (head, query, key)."""
    if j > i:
        return False
    if j == i:  # always allowed: no row is ever empty
        return True
    if name == "sliding_window":
        return i - j < o["window"]
    if name == "local":
        b = o["block_size"]
        return i // b - o["look_back"] <= j // b <= i // b
    if name == "dilated":
        return (i - j) % o["dilation"] == 0 and (i - j) // o["dilation"] < o["window"]
    if name == "longformer":
        window = o["window"] if o["layer_windows"] is None else o["layer_windows"][layer]
        d = o["dilation"] if h >= n_head - o["dilated_heads"] else 1
        return j < o["global_tokens"] or ((i - j) % d == 0 and (i - j) // d < window)
    if name in ("sparse_strided", "sparse_fixed"):
        stride = o["stride"]
        if name == "sparse_strided":
            a1, a2 = i - j <= stride, (i - j) % stride == 0
        else:
            a1, a2 = j // stride == i // stride, j % stride >= stride - o["summary"]
        if o["layout"] == "union":
            return a1 or a2
        first = h < n_head // 2 if o["layout"] == "heads" else layer % 2 == 0
        return a1 if first else a2
    if name == "blockwise":
        shift = o["shifts"][h // (n_head // len(o["shifts"]))]
        return j // o["block_size"] == i // o["block_size"] - shift
    raise KeyError(name)


def spec_mask(name, options, n, layer=0, n_head=N_HEAD) -> torch.Tensor:
    return torch.tensor(
        [
            [
                [spec_allowed(name, options, h, i, j, layer, n_head) for j in range(n)]
                for i in range(n)
            ]
            for h in range(n_head)
        ]
    )


def _dims(context_length: int = 256, n_layer: int = N_LAYER) -> ModelSettings:
    return ModelSettings(
        n_layer=n_layer, n_head=N_HEAD, d_model=N_HEAD * HEAD_DIM, context_length=context_length
    )


def _backend(name, options, **dims):
    return build_backend({"name": name, **options}, _dims(**dims))


def _qkv(n, dtype=torch.float64, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, N_HEAD, n, HEAD_DIM, generator=g).to(dtype) for _ in range(3)]


def _slopes(alibi: bool):
    return torch.tensor([0.5, 0.25, 0.125, 0.0625], dtype=torch.float64) if alibi else None


@pytest.mark.parametrize(("name", "options"), CONFIGS, ids=IDS)
def test_pattern_predicate_is_the_spec(name, options):
    backend = _backend(name, options)
    pos = torch.arange(SEQ)
    for layer in range(N_LAYER):
        got = pattern_mask(backend.pattern(layer).allowed, N_HEAD, pos, pos)
        assert torch.equal(got, spec_mask(name, options, SEQ, layer)), f"layer {layer}"


def _engine_vs_reference(name, options, dtype, alibi, n, layer):
    pattern = _backend(name, options).pattern(layer)
    q, k, v = _qkv(n, dtype)
    slopes = _slopes(alibi)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    results = []
    for attend in (pattern.attend, lambda *a: reference_attention(*a[:3], pattern.allowed, a[3])):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = attend(*leaves, None if slopes is None else slopes.to(dtype))
        results.append((out, *torch.autograd.grad(out, leaves, grad)))
    return results


@pytest.mark.parametrize("alibi", [False, True], ids=["no-alibi", "alibi"])
@pytest.mark.parametrize(("name", "options"), CONFIGS, ids=IDS)
def test_engine_equals_dense_reference(name, options, alibi):
    """Output and dq, dk, dv of the core in fp64 (1e-10) and fp32 (1e-5), every layer's pattern."""
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        for n, layer in ((SEQ, 0), (37, 1)):
            engine, reference = _engine_vs_reference(name, options, dtype, alibi, n, layer)
            for label, got, want in zip(("out", "dq", "dk", "dv"), engine, reference):
                torch.testing.assert_close(
                    got, want, rtol=tol, atol=tol, msg=f"{label} {dtype} n={n}"
                )


@pytest.fixture
def one_query_block_per_chunk(monkeypatch):
    """Chunks of a single query block, as long windows get at real sizes (W=512: 9 key blocks of
    64 already exceed the chunk budget): their keys are views of the key sequence and the key
    gradients accumulate in place, a path the small test windows would otherwise never reach."""
    monkeypatch.setattr(sparse_engine, "CHUNK_SCORES", 1)
    component_parts.cache_clear()  # layouts are cached per (pattern, length)
    yield
    component_parts.cache_clear()


@pytest.mark.parametrize(("name", "options"), CONFIGS, ids=IDS)
def test_engine_equals_dense_reference_one_query_block_per_chunk(
    name, options, one_query_block_per_chunk
):
    pattern = _backend(name, options).pattern(0)
    parts = [part for _, _, c in pattern.groups for part in component_parts(c, SEQ)]
    assert all(
        chunk.end - chunk.first == 1 for part in parts for chunk in getattr(part, "chunks", ())
    )
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        for alibi in (False, True):
            engine, reference = _engine_vs_reference(name, options, dtype, alibi, SEQ, 0)
            for label, got, want in zip(("out", "dq", "dk", "dv"), engine, reference):
                torch.testing.assert_close(
                    got, want, rtol=tol, atol=tol, msg=f"{label} {dtype} alibi={alibi}"
                )


def test_long_windows_take_the_in_place_key_path(one_query_block_per_chunk):
    """The test above covers the span path at all: band layouts do produce span chunks."""
    pattern = _backend("sliding_window", {"window": 5}).pattern(0)
    (layout,) = component_parts(pattern.groups[0][2], SEQ)
    assert sum(chunk.span is not None for chunk in layout.chunks) >= len(layout.chunks) - 1


@pytest.mark.parametrize(("name", "options"), CONFIGS[::2], ids=IDS[::2])
def test_engine_bf16_is_close_to_fp32_reference(name, options):
    pattern = _backend(name, options).pattern(0)
    q, k, v = _qkv(SEQ, torch.bfloat16)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(7)).bfloat16()
    results = []
    for dtype, attend in (
        (torch.bfloat16, pattern.attend),
        (torch.float32, lambda *a: reference_attention(*a[:3], pattern.allowed)),
    ):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = attend(*leaves, None)
        assert out.dtype == dtype
        results.append(
            [t.float() for t in (out, *torch.autograd.grad(out, leaves, grad.to(dtype)))]
        )
    for label, got, want in zip(("out", "dq", "dk", "dv"), *results):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=5e-2, msg=label)


@pytest.mark.parametrize(("name", "options"), CONFIGS, ids=IDS)
def test_core_gradient_to_the_future_is_exactly_zero(name, options):
    pattern = _backend(name, options).pattern(0)
    q, k, v = (t.requires_grad_() for t in _qkv(SEQ))
    out = pattern.attend(q, k, v, None)
    for i in (0, 5, 6, 15, 16, 31, 32, SEQ - 2):
        dq, dk, dv = torch.autograd.grad(out[:, :, i].sum(), (q, k, v), retain_graph=True)
        assert dk[:, :, i + 1 :].abs().max() == 0 and dv[:, :, i + 1 :].abs().max() == 0, i
        others = torch.ones(SEQ, dtype=torch.bool)
        others[i] = False
        assert dq[:, :, others].abs().max() == 0, i
        assert dv[:, :, i].abs().sum() > 0  # j = i is always read


@pytest.mark.parametrize(("name", "options"), CONFIGS, ids=IDS)
def test_one_layer_receptive_field_is_the_spec_pattern(name, options):
    """Input positions that change output i of a one-layer model == union over heads of P(i, j)."""
    options = dict(options)
    if options.get("layer_windows"):
        options["layer_windows"] = options["layer_windows"][:1]
    cfg = model_config(name, options, "model.n_layer=1")
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB).double().eval()
    assert torch.equal(receptive_field(model, SEQ), spec_mask(name, options, SEQ).any(0))


@pytest.mark.parametrize(
    ("name", "options"),
    [c for c in CONFIGS if c[1].get("layout") == "layers"] + [CONFIGS[5]],
    ids=lambda c: str(c),
)
def test_second_layer_mixer_receptive_field(name, options):
    """Layer 1 of a 2-layer model (A2 for layout=layers, the second window for longformer)."""
    model = build_model(model_config(name, options), VOCAB).double().eval()
    mixer = model.blocks[1].mixer
    x = torch.randn(
        1, SEQ, N_HEAD * HEAD_DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(4)
    )
    assert torch.equal(changed_outputs(mixer, x), spec_mask(name, options, SEQ, layer=1).any(0))


@pytest.mark.parametrize(("name", "options"), CONFIGS, ids=IDS)
def test_streaming_cache_holds_exactly_the_reachable_keys(name, options):
    """After n tokens the cache holds the keys j < n that some query i >= n can read, no more."""
    reach = 40
    for layer in range(N_LAYER):
        core = SparseCore(_backend(name, options).pattern(layer))
        q, k, v = _qkv(SEQ + reach, batch=1)
        cache, start = core.init_cache(1, N_HEAD, HEAD_DIM, q), 0
        for size in (1, 7, 5, 13, 1, 9, 17):
            stop = start + size
            out, cache = core.step(
                q[:, :, start:stop], k[:, :, start:stop], v[:, :, start:stop], cache, start, None
            )
            want = spec_mask(name, options, stop + reach, layer)[:, stop:, :stop].any(0).any(0)
            assert torch.equal(cache["pos"], torch.nonzero(want).flatten()), (layer, stop)
            assert cache["k"].shape[2] == len(cache["pos"])
            start = stop


EXTRA_STREAMING = [c for c in CONFIGS if c[1].get("layout") in ("union", "layers")] + [CONFIGS[15]]


@pytest.mark.parametrize("position", ["rope", "alibi"])
@pytest.mark.parametrize(("name", "options"), EXTRA_STREAMING, ids=lambda c: str(c))
def test_chunked_step_equals_forward_for_other_layouts(name, options, position):
    """The common test covers the shared table; this covers the other layouts and ALiBi."""
    torch.manual_seed(0)
    model = (
        build_model(model_config(name, options, f"model.position={position}"), VOCAB)
        .double()
        .eval()
    )
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = model(ids)
        for chunks in ([7] * 8, [5, 1, 13, 30, 4]):
            state, outputs, start = model.init_state(2), [], 0
            for size in chunks:
                logits, state = model.step(ids[:, start : start + size], state)
                outputs.append(logits)
                start += size
            torch.testing.assert_close(torch.cat(outputs, 1), reference, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(("name", "options"), CONFIGS, ids=IDS)
def test_attention_flops_count_at_least_the_allowed_pairs(name, options):
    """FLOPs = 4 x head_dim x computed pairs per head: never below the pattern's own pairs."""
    backend = _backend(name, options)
    n = 97
    allowed = (
        sum(spec_mask(name, options, n, layer).sum().item() for layer in range(N_LAYER)) / N_LAYER
    )
    assert backend.attention_flops(n) >= 4 * HEAD_DIM * allowed


def test_window_flops_grow_linearly():
    backend = _backend("sliding_window", {"window": 512}, context_length=65536)
    for n in (4096, 16384):
        exact = sum(min(i + 1, 512) for i in range(n)) * N_HEAD
        # one tile of waste on each side of the band at most
        assert (
            exact * 4 * HEAD_DIM
            <= backend.attention_flops(n)
            <= (exact + n * N_HEAD * 128) * 4 * HEAD_DIM
        )


FLEX_CONFIGS = [
    ("sliding_window", {"window": 130}),
    ("local", {"block_size": 200, "look_back": 1}),
    ("dilated", {"window": 40, "dilation": 3}),
    (
        "longformer",
        {
            "window": 70,
            "dilation": 2,
            "dilated_heads": 2,
            "global_tokens": 5,
            "layer_windows": None,
        },
    ),
    ("sparse_strided", {"stride": 100, "layout": "heads"}),
    ("sparse_fixed", {"stride": 100, "summary": 20, "layout": "heads"}),
    ("sparse_fixed", {"stride": 100, "summary": 20, "layout": "union"}),
    ("blockwise", {"block_size": 150, "shifts": [0, 1]}),
]
# Flex's compiled CPU forward cannot return a log-sum-exp (torch 2.13), which the union of
# sparse_strided's two query orders needs to merge: that layout is checked with the unfused
# Flex forward here (test_union_of_two_query_orders_...) and compiled on the GPU.
FLEX_N = 300  # several 128-tiles, a partial last one; batch 2 and the tiny model's heads, so
# the model-level kernel tests (test_kernel_seam.py) reuse these compiled kernels


def _plan_multiplicity(pattern, n):
    """[H, n, n]: how many (plan, key slot) pairs give query i key j, over the Flex plans."""
    counts = torch.zeros(pattern.n_head, n, n, dtype=torch.long)
    for first, end, component in pattern.groups:
        for plan in component.slot_plans(n, torch.device("cpu")):
            kv = torch.arange(len(plan.k_pos))
            inside = ((kv >= plan.lo[:, :, None]) & (kv <= plan.hi[:, :, None])).any(0)
            rows, cols = inside.nonzero(as_tuple=True)
            dense = torch.zeros(n, n, dtype=torch.long)
            dense.index_put_(
                (plan.q_pos[rows], plan.k_pos[cols]), torch.ones_like(rows), accumulate=True
            )
            counts[first:end] += dense
    return counts


@pytest.mark.parametrize(("name", "options"), CONFIGS + FLEX_CONFIGS, ids=lambda c: str(c))
def test_flex_slot_plans_give_every_allowed_key_exactly_once(name, options):
    """The plans' intervals, mapped back to positions, are the pattern of docs/attention.md: each
    allowed key once (the union layout's two plans included), nothing else."""
    for n in (SEQ, FLEX_N):
        backend = _backend(name, options, context_length=FLEX_N)
        for layer in range(N_LAYER):
            got = _plan_multiplicity(backend.pattern(layer), n)
            assert torch.equal(got, spec_mask(name, options, n, layer).long()), (n, layer)


@pytest.mark.parametrize(("name", "options"), CONFIGS + FLEX_CONFIGS, ids=lambda c: str(c))
def test_flex_tiles_cover_the_pattern_and_full_tiles_need_no_mask(name, options):
    """Every tile holding an allowed slot pair is read; every tile marked full holds only
    allowed pairs (mask_mod is skipped there). Built without an N x N mask."""
    pattern = _backend(name, options, context_length=FLEX_N).pattern(0)
    for _, _, component in pattern.groups:
        for plan in component.slot_plans(FLEX_N, torch.device("cpu")):
            read, full = tile_grids(plan)
            mq, mk = len(plan.q_pos), len(plan.k_pos)
            kv = torch.arange(mk)
            inside = ((kv >= plan.lo[:, :, None]) & (kv <= plan.hi[:, :, None])).any(0)
            tq, tk = read.shape
            pad = (0, tk * TILE - mk, 0, tq * TILE - mq)
            grid = torch.nn.functional.pad(inside, pad).view(tq, TILE, tk, TILE)
            real = torch.nn.functional.pad(torch.ones(mq, mk, dtype=torch.bool), pad)
            needed = grid.any(-1).any(1)
            all_allowed = (grid | ~real.view(tq, TILE, tk, TILE)).all(-1).all(1)
            assert not (needed & ~read).any()
            assert not (full & ~all_allowed).any()
            assert not (full & ~read).any()


@pytest.mark.parametrize(
    ("name", "options"),
    [(name, {}) for name in ("sparse_strided", "sparse_fixed")]
    + [
        (name, {"layout": layout})
        for name in ("sparse_strided", "sparse_fixed")
        for layout in ("union", "layers")
    ],
    ids=lambda c: str(c),
)
def test_sparse_transformer_reads_few_causal_tiles_at_32k_under_flex(name, options):
    """Regrouped by residue (strided) and with the summary columns as their own key region
    (fixed), the Sparse Transformer patterns read at most a quarter of the causal tiles that
    dense attention reads (docs/kernels.md lists the fractions)."""
    backend = build_backend({"name": name, **options}, ModelSettings(2, 8, 512, 32768))
    for layer in range(N_LAYER):
        read, causal = tile_counts(backend.pattern(layer), 32768)
        assert read <= 0.25 * causal, (layer, read / causal)


def _core_outputs(name, options, kernel, dtype, alibi, batch=2):
    pattern = _backend(name, options, context_length=FLEX_N).pattern(0)
    q, k, v = _qkv(FLEX_N, dtype, batch=batch)
    slopes = None if not alibi else _slopes(True).to(dtype)
    with torch.no_grad():
        return SparseCore(pattern, kernel)(q, k, v, slopes), pattern, (q, k, v), slopes


@pytest.mark.parametrize("alibi", [False, True], ids=["no-alibi", "alibi"])
@pytest.mark.parametrize(("name", "options"), FLEX_CONFIGS, ids=lambda c: str(c))
def test_compiled_flex_forward_on_cpu_equals_reference_and_engine_fp32(name, options, alibi):
    """kernel=flex forced through the seam: the compiled CPU Flex forward (BlockMask with full
    tiles, mask_mod from the slot tables, ALiBi score_mod) against the dense reference and the
    CPU engine, at a length that is no multiple of the tile."""
    got, pattern, (q, k, v), slopes = _core_outputs(name, options, "flex", torch.float32, alibi)
    engine, *_ = _core_outputs(name, options, "torch", torch.float32, alibi)
    want = reference_attention(q, k, v, pattern.allowed, slopes)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, engine, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("name", "options"), FLEX_CONFIGS, ids=lambda c: str(c))
def test_compiled_flex_forward_on_cpu_bf16_is_close_to_fp32_reference(name, options):
    """bf16 Flex against the fp32 reference on the same bf16 inputs (same tolerance as the
    engine's bf16 test above)."""
    got, pattern, (q, k, v), _ = _core_outputs(name, options, "flex", torch.bfloat16, False)
    want = reference_attention(q.float(), k.float(), v.float(), pattern.allowed)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=5e-2)


@pytest.fixture
def unfused_flex(monkeypatch):
    """FlexAttention's eager (unfused) forward, which returns the log-sum-exp on a CPU: it applies
    mask_mod and score_mod to every pair but ignores the BlockMask's tiles (those are checked by
    the tile test above and by the compiled forward on a GPU)."""
    from torch.nn.attention.flex_attention import flex_attention

    monkeypatch.setattr(softmax_flex, "_compiled", lambda: flex_attention)


@pytest.mark.parametrize("alibi", [False, True], ids=["no-alibi", "alibi"])
def test_union_of_two_query_orders_merges_exactly_by_log_sum_exp(unfused_flex, alibi):
    options = {"stride": 5, "layout": "union"}
    pattern = _backend("sparse_strided", options).pattern(0)
    assert len(pattern.groups[0][2].slot_plans(SEQ, torch.device("cpu"))) == 2
    q, k, v = _qkv(SEQ, torch.float32)
    slopes = None if not alibi else _slopes(True).float()
    with torch.no_grad():
        got = SparseCore(pattern, "flex")(q, k, v, slopes)
    want = reference_attention(q, k, v, pattern.allowed, slopes)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Flex backward needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("alibi", [False, True], ids=["no-alibi", "alibi"])
@pytest.mark.parametrize(
    ("name", "options"),
    FLEX_CONFIGS + [("sparse_strided", {"stride": 100, "layout": "union"})],
    ids=lambda c: str(c),
)
def test_cuda_flex_forward_and_backward_equal_reference(name, options, alibi, dtype):
    pattern = _backend(name, options, context_length=FLEX_N).pattern(0)
    # Inputs rounded to `dtype` once: the fp32 reference sees the same values as the kernel.
    q, k, v = (t.to(dtype).float().cuda() for t in _qkv(FLEX_N, torch.float32))
    slopes = None if not alibi else _slopes(True).float().cuda()
    grad = torch.randn_like(q).to(dtype).float()
    results = []
    for attend, inputs_dtype in (
        (lambda *a: SparseCore(pattern, "flex")(*a, slopes), dtype),
        (lambda *a: reference_attention(*a, pattern.allowed, slopes), torch.float32),
    ):
        leaves = [t.to(inputs_dtype).requires_grad_() for t in (q, k, v)]
        out = attend(*leaves)
        results.append(
            [t.float() for t in (out, *torch.autograd.grad(out, leaves, grad.to(out.dtype)))]
        )
    tol = {"rtol": 2e-3, "atol": 2e-3} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 5e-2}
    for label, got, want in zip(("out", "dq", "dk", "dv"), *results):
        torch.testing.assert_close(got, want, msg=label, **tol)


INVALID = [
    ("sliding_window", {"window": 0}, (), "window"),
    ("dilated", {"dilation": 0}, (), "dilation"),
    ("dilated", {"window": 0}, (), "window"),
    ("local", {"block_size": 0}, (), "block_size"),
    ("local", {"look_back": -1}, (), "look_back"),
    ("local", {"block_size": 512}, ("context_length=256",), "context_length"),
    ("longformer", {"dilated_heads": 5}, ("model.n_head=4",), "dilated_heads"),
    ("longformer", {"layer_windows": [8, 8, 8]}, ("model.n_layer=2",), "layer_windows"),
    ("longformer", {"layer_windows": [8, 0]}, ("model.n_layer=2",), "layer_windows"),
    ("longformer", {"global_tokens": -1}, (), "global_tokens"),
    ("sparse_strided", {"stride": 0}, (), "stride"),
    ("sparse_strided", {"layout": "diagonal"}, (), "layout"),
    ("sparse_strided", {"layout": "heads"}, ("model.n_head=3", "model.d_model=48"), "even"),
    ("sparse_strided", {"stride": 300}, ("context_length=256",), "context_length"),
    ("sparse_fixed", {"summary": 200}, (), "summary"),
    ("sparse_fixed", {"summary": 0}, (), "summary"),
    ("sparse_fixed", {"layout": "heads"}, ("model.n_head=3", "model.d_model=48"), "even"),
    ("sparse_fixed", {"layout": "rows"}, (), "layout"),
    ("blockwise", {"shifts": [0, 1, 2]}, ("model.n_head=4",), "shifts"),
    ("blockwise", {"shifts": [0, -1]}, (), "shifts"),
    ("blockwise", {"shifts": []}, (), "shifts"),
    ("blockwise", {"block_size": 0}, (), "block_size"),
    ("blockwise", {"block_size": 512}, ("context_length=256",), "context_length"),
]


@pytest.mark.parametrize(("name", "options", "overrides", "key"), INVALID, ids=lambda c: str(c))
def test_invalid_settings_are_refused_at_build_time(name, options, overrides, key):
    with pytest.raises(ConfigError, match=key):
        build_model(model_config(name, options, *overrides), VOCAB)


@pytest.mark.parametrize("name", sorted({c[0] for c in CONFIGS}))
def test_spec_defaults_build_with_the_default_context(name):
    """`attention=<name>` alone (spec defaults, context_length 256) builds and runs."""
    model = build_model(model_config(name), VOCAB)
    assert model(torch.randint(0, VOCAB, (1, 300))).shape == (1, 300, VOCAB)


@pytest.mark.parametrize(("name", "options"), EXTRA_STREAMING[:2], ids=lambda c: str(c))
def test_a_long_prompt_given_to_step_is_attended_in_pieces(name, options, monkeypatch):
    """With a budget of a few scores, step() takes its queries a few at a time: same logits."""
    torch.manual_seed(0)
    model = build_model(model_config(name, options), VOCAB).double().eval()
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        whole, _ = model.step(ids, model.init_state(2))
        monkeypatch.setattr(pieces, "TRANSIENT_SCORES", 2 * N_HEAD * SEQ * 3)
        pieced, _ = model.step(ids, model.init_state(2))
    torch.testing.assert_close(pieced, whole, rtol=1e-10, atol=1e-10)
