"""`moba` (content-based block sparsity) against docs/attention.md and the module docstring.

The gate is re-written here as a plain per-query Python loop; the engine is held equal to the
dense masked reference built from the SAME selection (outputs and dq, dk, dv in fp64, fp32 and
bf16, with and without ALiBi, both kernels, lengths that are not block multiples, several tile
and wave sizes). Causality is checked bit for bit, including through the gate; streaming is held
equal to forward for many chunkings; the one-layer receptive field is probed by perturbation.

bf16 tolerance: outputs and gradients within 3e-2 absolute + 3e-2 relative of the fp32 engine on
the same bf16 inputs (measured max error about 1e-2 for values of order 1: probabilities are cast
to bf16 for the value matmuls inside the kernel, statistics and the merge stay fp32).
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from conftest import model_config

from longctx import build_model
from longctx.attention import ModelSettings, build_backend
from longctx.attention.moba import MobaCore
from longctx.core.positions import alibi_slopes
from longctx.errors import ConfigError
from longctx.ops import pieces
from longctx.ops.moba import engine as moba_kernel
from longctx.ops.moba.engine import block_sparse_attention
from longctx.ops.moba.flex import _tile_grids, flex_moba_attention
from longctx.ops.moba.gate import block_key_sums, select_blocks
from longctx.ops.moba.reference import reference_moba_attention, selection_mask
from longctx.ops.softmax.flex import TILE

VOCAB = 37
KERNELS = sorted(moba_kernel.KERNELS)


def _qkv(batch=2, heads=3, n=45, dim=8, dtype=torch.float64, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(batch, heads, n, dim, generator=g, dtype=dtype).requires_grad_(grad)
        for _ in range(3)
    )


def naive_selection(
    q: torch.Tensor, k: torch.Tensor, block_size: int, top_k: int, q_start: int = 0
):
    """The spec's gate in exact rational arithmetic, one query at a time:
    q . mean key of each complete earlier block, the top_k scores, ties to the earlier block;
    ascending, padded with -1."""
    batch, heads, n, dim = q.shape
    slots = min(top_k, k.shape[2] // block_size)
    out = torch.full((batch, heads, n, slots), -1, dtype=torch.long)
    for b in range(batch):
        for h in range(heads):
            keys = [[Fraction(x) for x in row] for row in k[b, h].tolist()]
            means = [
                [
                    sum(keys[j][d] for j in range(m * block_size, (m + 1) * block_size))
                    / block_size
                    for d in range(dim)
                ]
                for m in range(k.shape[2] // block_size)
            ]
            for t in range(n):
                query = [Fraction(x) for x in q[b, h, t].tolist()]
                c = (q_start + t) // block_size
                scores = [(sum(a * m for a, m in zip(query, means[m])), m) for m in range(c)]
                chosen = sorted(m for _, m in sorted(scores, key=lambda s: (-s[0], s[1]))[:top_k])
                out[b, h, t, : len(chosen)] = torch.tensor(chosen, dtype=torch.long)
    return out


def dense_reference(q, k, v, selected, block_size, slopes=None):
    return reference_moba_attention(q, k, v, selected, block_size, slopes)


# ---------------------------------------------------------------------------------------------
# The gate


@pytest.mark.parametrize("gate_dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("inputs", ["random", "identical_blocks", "integers"])
def test_selection_equals_the_naive_gate(inputs, gate_dtype, monkeypatch):
    """Both gate dtypes (torch kernel: fp64, flex kernel: fp32) select the exact top-k here."""
    q, k, _ = _qkv(n=45, dim=4, dtype=torch.float32)
    if inputs == "identical_blocks":  # every block has the same mean: exact ties everywhere
        k = k[:, :, :5].repeat(1, 1, 9, 1)
    if inputs == "integers":  # many exactly equal scores
        q, k = q.round(), k.round()
    expected = naive_selection(q, k, 5, 3)
    sums = block_key_sums(k, 5, gate_dtype)
    assert sums.dtype == gate_dtype
    assert torch.equal(select_blocks(q, sums, 0, 5, 3), expected)
    monkeypatch.setattr(pieces, "TRANSIENT_SCORES", 7)  # a few queries per gate chunk
    assert torch.equal(select_blocks(q, sums, 0, 5, 3), expected)
    # Queries given from a later block boundary, as streaming does, select the same blocks.
    assert torch.equal(select_blocks(q[:, :, 20:], sums, 20, 5, 3), expected[:, :, 20:])


def test_block_key_sums_are_the_same_whichever_call_computes_them():
    _, k, _ = _qkv(n=4 * 13, dtype=torch.float32)
    whole = block_key_sums(k, 13)
    one_by_one = torch.cat(
        [block_key_sums(k[:, :, m * 13 : (m + 1) * 13], 13) for m in range(4)], dim=2
    )
    assert torch.equal(whole, one_by_one)
    torch.testing.assert_close(whole, k.double().view(2, 3, 4, 13, 8).sum(3), rtol=1e-6, atol=1e-6)


def test_selection_never_reads_the_current_or_later_blocks():
    """Keys of the query's own (incomplete) block and of later blocks never change its selection."""
    q, k, _ = _qkv(n=45, dim=4)
    base = select_blocks(q, block_key_sums(k, 5), 0, 5, 3)
    for t in (4, 5, 6, 22, 44):
        changed = k.clone()
        changed[:, :, t + 1 :] *= -100.0
        after = select_blocks(q, block_key_sums(changed, 5), 0, 5, 3)
        assert torch.equal(after[:, :, : t + 1], base[:, :, : t + 1])


# ---------------------------------------------------------------------------------------------
# The engine against the dense reference with the same selection


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("alibi", [False, True], ids=["rope", "alibi"])
@pytest.mark.parametrize(
    "dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["fp64", "fp32"]
)
@pytest.mark.parametrize(
    "tile,wave", [(256, 1 << 16), (4, 1 << 16), (3, 50)], ids=["one-tile", "tiles", "waves"]
)
def test_engine_equals_dense_reference(kernel, alibi, dtype, tol, tile, wave, monkeypatch):
    """Outputs and dq, dk, dv: no gradient reaches the gate (the reference holds the mask fixed)."""
    monkeypatch.setattr(moba_kernel, "WAVE_PAIRS", wave)
    q, k, v = _qkv(n=45, dtype=dtype, grad=True)
    slopes = alibi_slopes(3).to(dtype) if alibi else None
    selected = select_blocks(q, block_key_sums(k.detach(), 6), 0, 6, 3)
    out = block_sparse_attention(
        q, k, v, selected, 6, slopes, kernel=kernel, tile=tile, max_rows=40
    )
    ref = dense_reference(q, k, v, selected, 6, slopes)
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    grad = torch.randn_like(out)
    for got, want in zip(
        torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)
    ):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("kernel", KERNELS)
def test_engine_handles_more_slots_than_earlier_blocks_and_top_k_zero(kernel):
    q, k, v = _qkv(n=13, dim=4, grad=True)
    for top_k in (0, 5):  # 0: own block only; 5 > the 2 complete blocks: every earlier block
        selected = select_blocks(q, block_key_sums(k.detach(), 5), 0, 5, top_k)
        out = block_sparse_attention(q, k, v, selected, 5, kernel=kernel)
        torch.testing.assert_close(
            out, dense_reference(q, k, v, selected, 5), rtol=1e-10, atol=1e-10
        )


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("alibi", [False, True], ids=["rope", "alibi"])
def test_bf16_engine_is_close_to_fp32(kernel, alibi):
    q, k, v = _qkv(n=45, dtype=torch.float32, grad=True)
    slopes = alibi_slopes(3) if alibi else None
    selected = select_blocks(q, block_key_sums(k.detach(), 6), 0, 6, 3)
    low = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    out = block_sparse_attention(q, k, v, selected, 6, slopes, kernel=kernel)
    out_bf16 = block_sparse_attention(*low, selected, 6, slopes, kernel=kernel)
    grad = torch.randn_like(out)
    torch.testing.assert_close(out_bf16.float(), out, rtol=3e-2, atol=3e-2)
    fp32_grads = torch.autograd.grad(out, (q, k, v), grad)
    for got, want in zip(torch.autograd.grad(out_bf16, low, grad.bfloat16()), fp32_grads):
        torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("kernel", KERNELS)
def test_engine_matches_reference_from_a_block_boundary(kernel):
    """q_start > 0 (what streaming uses): queries of positions 12.. against keys 0.., gradients
    included (keys before the first query block are reached through selected blocks only)."""
    q, k, v = _qkv(n=45, grad=True)
    selected = select_blocks(q, block_key_sums(k.detach(), 6), 0, 6, 3)
    full = dense_reference(q, k, v, selected, 6)[:, :, 12:]
    part = block_sparse_attention(
        q[:, :, 12:], k, v, selected[:, :, 12:], 6, q_start=12, kernel=kernel
    )
    torch.testing.assert_close(part, full, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(part)
    for got, want in zip(
        torch.autograd.grad(part, (q, k, v), grad), torch.autograd.grad(full, (q, k, v), grad)
    ):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# Causality, including through the gate


@pytest.mark.parametrize("alibi", [False, True], ids=["rope", "alibi"])
def test_future_keys_never_change_earlier_outputs(alibi):
    """Perturbing keys and values after t (the rest of t's own block and later blocks, so the
    mean of an incomplete block would change) leaves outputs <= t bit-identical."""
    core = MobaCore(block_size=5, top_k=2)
    q, k, v = _qkv(n=43, dtype=torch.float32)
    slopes = alibi_slopes(3) if alibi else None
    base = core(q, k, v, slopes)
    for t in (0, 3, 4, 5, 9, 21, 41):
        k2, v2 = k.clone(), v.clone()
        k2[:, :, t + 1 :] = 50.0 * torch.randn_like(k2[:, :, t + 1 :])
        v2[:, :, t + 1 :] = 50.0 * torch.randn_like(v2[:, :, t + 1 :])
        assert torch.equal(core(q, k2, v2, slopes)[:, :, : t + 1], base[:, :, : t + 1]), (
            f"leak into <= {t}"
        )


@pytest.mark.parametrize("t", [4, 5, 6, 23])
def test_no_gradient_reaches_the_future(t):
    core = MobaCore(block_size=5, top_k=2)
    q, k, v = _qkv(n=43, grad=True)
    core(q, k, v, None)[:, :, t].sum().backward()
    for x in (q, k, v):
        assert x.grad[:, :, t + 1 :].abs().max() == 0
    assert k.grad[:, :, : t + 1].abs().sum() > 0


def _one_layer(position="rope"):
    cfg = model_config(
        "moba", {"block_size": 4, "top_k": 1}, "model.n_layer=1", f"model.position={position}"
    )
    torch.manual_seed(0)
    return build_model(cfg, VOCAB).double().eval()


def _capture_qk(model, ids):
    """q, k of the single layer's core as it sees them (after RoPE)."""
    seen = {}
    handle = model.blocks[0].mixer.core.register_forward_hook(
        lambda m, args, out: seen.update(q=args[0], k=args[1])
    )
    with torch.no_grad():
        logits = model(ids)
    handle.remove()
    return logits, seen["q"], seen["k"]


def test_one_layer_receptive_field_follows_the_selection():
    """Output i depends on the keys j <= i of its own block and on its selected blocks only: a token
    in a block that no head selects (and whose change flips no selection) leaves logits i
    bit-identical; a token of the own block or of a selected block changes them."""
    model = _one_layer()
    ids = torch.randint(0, VOCAB, (1, 64), generator=torch.Generator().manual_seed(3))
    logits, q, k = _capture_qk(model, ids)
    selected = select_blocks(q, block_key_sums(k, 4), 0, 4, 1)[0]  # [H, n, 1]
    checked = {"unselected": 0, "selected": 0, "own": 0}
    for j in range(1, 64, 3):
        changed = ids.clone()
        changed[0, j] = (changed[0, j] + 1) % VOCAB
        after, q2, k2 = _capture_qk(model, changed)
        selected_after = select_blocks(q2, block_key_sums(k2, 4), 0, 4, 1)[0]
        for i in (47, 63):
            if j > i:
                continue
            if j // 4 == i // 4:
                assert not torch.equal(after[0, i], logits[0, i])
                checked["own"] += 1
            elif j // 4 in set(selected[:, i].flatten().tolist()):
                assert not torch.equal(after[0, i], logits[0, i])
                checked["selected"] += 1
            elif torch.equal(selected_after[:, i], selected[:, i]):
                assert torch.equal(after[0, i], logits[0, i]), (
                    f"token {j} in an unselected block reached {i}"
                )
                checked["unselected"] += 1
    assert min(checked.values()) > 0, checked


# ---------------------------------------------------------------------------------------------
# Streaming


def _stream(core, q, k, v, slopes, chunks):
    state, outputs, start = core.init_cache(q.shape[0], q.shape[1], q.shape[3], q), [], 0
    for size in chunks:
        if start >= q.shape[2]:
            break
        end = start + size
        out, new_state = core.step(
            q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], state, start, slopes
        )
        assert new_state is not state
        outputs.append(out)
        state, start = new_state, end
    return torch.cat(outputs, dim=2), state


CHUNKINGS = [[1] * 43, [5] * 9, [7] * 7, [3, 11, 2, 20, 7], [43], [4, 1, 14, 24]]


@pytest.mark.parametrize("alibi", [False, True], ids=["rope", "alibi"])
@pytest.mark.parametrize("inputs", ["random", "identical_blocks"])
def test_chunked_step_equals_forward(alibi, inputs):
    core = MobaCore(block_size=5, top_k=2)
    q, k, v = _qkv(n=43)
    if inputs == "identical_blocks":  # exact gate ties: both paths must break them the same way
        k, v = k[:, :, :5].repeat(1, 1, 9, 1)[:, :, :43], v[:, :, :5].repeat(1, 1, 9, 1)[:, :, :43]
    slopes = alibi_slopes(3).double() if alibi else None
    reference = core(q, k, v, slopes)
    for chunks in CHUNKINGS:
        streamed, state = _stream(core, q, k, v, slopes, chunks)
        torch.testing.assert_close(streamed, reference, rtol=1e-10, atol=1e-10)
    # The state: K/V of every past position and the key sums of the 8 complete blocks.
    assert state["k"].shape[2] == 43 and state["key_sums"].shape[2] == 8


def test_step_does_not_mutate_its_state():
    core = MobaCore(block_size=5, top_k=2)
    q, k, v = _qkv(n=20)
    _, state = _stream(core, q, k, v, None, [12])
    saved = {name: t.clone() for name, t in state.items()}
    first, _ = core.step(q[:, :, 12:20], k[:, :, 12:20], v[:, :, 12:20], state, 12, None)
    again, _ = core.step(q[:, :, 12:20], k[:, :, 12:20], v[:, :, 12:20], state, 12, None)
    assert torch.equal(first, again)
    assert all(torch.equal(state[name], saved[name]) for name in saved)


@pytest.mark.parametrize("position", ["rope", "alibi", "none"])
def test_model_streams_like_forward(position):
    model = _one_layer(position)
    ids = torch.randint(0, VOCAB, (2, 41), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = model(ids)
        state, outputs = model.init_state(2), []
        for start, end in [(0, 3), (3, 4), (4, 17), (17, 41)]:
            logits, state = model.step(ids[:, start:end], state)
            outputs.append(logits)
    torch.testing.assert_close(torch.cat(outputs, 1), reference, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# The Flex kernel: BlockMask from the selection on the device


FLEX_N = 300  # several 128-tiles and a partial one
# (block_size, top_k): blocks inside a tile, straddling tiles, and spanning several tiles.
FLEX_BLOCKS = [(24, 3), (48, 2), (160, 1)]


def _random_selection(n, block_size, top_k, batch=2, heads=4, seed=0):
    """A valid selection (distinct complete earlier blocks, ascending, -1 padded), as random as
    the gate could ever be: neighbouring queries share nothing."""
    g = torch.Generator().manual_seed(seed)
    slots = min(top_k, n // block_size)
    selected = torch.full((batch, heads, n, slots), -1, dtype=torch.long)
    for i in range(n):
        candidates = i // block_size
        if candidates:
            picks = torch.rand(batch, heads, candidates, generator=g).argsort(-1)[..., :slots]
            picks = picks.sort(-1).values
            selected[:, :, i, : picks.shape[-1]] = picks
    return selected


@pytest.mark.parametrize(("block_size", "top_k"), FLEX_BLOCKS)
def test_flex_tiles_cover_the_selection_and_full_tiles_need_no_mask(block_size, top_k):
    n = 3 * TILE  # whole tiles, so every row of a tile is a real query
    selected = _random_selection(n, block_size, top_k)
    # Every query of the last tile selects block 0 (complete and earlier for all of them): with
    # blocks of at least a tile, key tile 0 is then full for that query tile.
    last = selected[:, :, 2 * TILE :]
    last[..., 0] = torch.where((last == 0).any(-1), last[..., 0], 0)
    selected[:, :, 2 * TILE :] = last.sort(-1).values
    read, full = _tile_grids(selected, block_size, n)
    allowed = selection_mask(selected, block_size, n).view(2, 4, 3, TILE, 3, TILE)
    needed = allowed.any(-1).any(-2)
    all_allowed = allowed.all(-1).all(-2)
    assert not (needed & ~read).any()
    assert not (full & ~all_allowed).any()
    assert full[..., 2, 0].all() == (block_size >= TILE)


@pytest.mark.parametrize(
    ("block_size", "top_k", "alibi"),
    [(b, k, False) for b, k in FLEX_BLOCKS] + [(*FLEX_BLOCKS[1], True)],
    ids=lambda c: str(c),
)
def test_compiled_flex_forward_on_cpu_equals_reference_and_engine(block_size, top_k, alibi):
    """The compiled CPU Flex forward, with the same selection as the dense reference and the
    CPU engine, at a length that is no multiple of the tile. (Each top_k compiles its own
    kernel, about half a minute on a CPU: ALiBi is checked with one block layout.)"""
    q, k, v = _qkv(batch=2, heads=4, n=FLEX_N, dim=16, dtype=torch.float32)
    selected = _random_selection(FLEX_N, block_size, top_k)
    slopes = alibi_slopes(4) if alibi else None
    with torch.no_grad():
        got = flex_moba_attention(q, k, v, selected, block_size, slopes)
        engine = block_sparse_attention(q, k, v, selected, block_size, slopes)
    want = dense_reference(q, k, v, selected, block_size, slopes)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, engine, rtol=1e-5, atol=1e-5)


def test_compiled_flex_forward_on_cpu_bf16_is_close_to_fp32():
    q, k, v = _qkv(batch=2, heads=4, n=FLEX_N, dim=16, dtype=torch.float32)
    selected = _random_selection(FLEX_N, 48, 2)
    low = [t.bfloat16() for t in (q, k, v)]
    with torch.no_grad():
        got = flex_moba_attention(*low, selected, 48, None)
    want = dense_reference(*[t.float() for t in low], selected, 48)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=3e-2)


def test_flex_core_forced_through_the_seam_equals_the_torch_core():
    """MobaCore with kernel=flex (fp32 gate) against kernel=torch (fp64 gate): same selection on
    these inputs, same outputs."""
    q, k, v = _qkv(batch=2, heads=4, n=FLEX_N, dim=16, dtype=torch.float32)
    with torch.no_grad():
        got = MobaCore(48, 2, "flex")(q, k, v, None)
        want = MobaCore(48, 2, "torch")(q, k, v, None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Flex backward needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("alibi", [False, True], ids=["no-alibi", "alibi"])
@pytest.mark.parametrize(("block_size", "top_k"), FLEX_BLOCKS)
def test_cuda_flex_forward_and_backward_equal_reference(block_size, top_k, alibi, dtype):
    q, k, v = (t.to(dtype).float().cuda() for t in _qkv(2, 4, FLEX_N, 16, torch.float32))
    selected = _random_selection(FLEX_N, block_size, top_k).cuda()
    slopes = alibi_slopes(4).cuda() if alibi else None
    grad = torch.randn_like(q).to(dtype).float()
    results = []
    for attend, inputs_dtype in (
        (lambda *a: flex_moba_attention(*a, selected, block_size, slopes), dtype),
        (lambda *a: dense_reference(*a, selected, block_size, slopes), torch.float32),
    ):
        leaves = [t.to(inputs_dtype).requires_grad_() for t in (q, k, v)]
        out = attend(*leaves)
        grads = torch.autograd.grad(out, leaves, grad.to(out.dtype))
        results.append([t.float() for t in (out, *grads)])
    tol = {"rtol": 2e-3, "atol": 2e-3} if dtype == torch.float32 else {"rtol": 3e-2, "atol": 3e-2}
    for label, got, want in zip(("out", "dq", "dk", "dv"), *results):
        torch.testing.assert_close(got, want, msg=label, **tol)


# ---------------------------------------------------------------------------------------------
# Backend: config, FLOPs


def _backend(context_length=64, d_model=32, **options):
    dims = ModelSettings(n_layer=1, n_head=4, d_model=d_model, context_length=context_length)
    return build_backend({"name": "moba", **options}, dims)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"block_size": 0}, "block_size must be >= 1"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"block_size": 128}, "longer than context_length=64"),
    ],
)
def test_config_errors_say_what_to_change(options, message):
    with pytest.raises(ConfigError, match=message):
        _backend(**options)


def test_defaults_are_block_256_top_4():
    backend = _backend(context_length=4096)
    assert (backend.options.block_size, backend.options.top_k) == (256, 4)


@pytest.mark.parametrize("n,block_size,top_k", [(45, 6, 3), (48, 6, 3), (13, 5, 0), (13, 5, 9)])
def test_attention_flops_count_the_pairs_computed(n, block_size, top_k):
    """4 FLOPs per (query, key) pair per d_model channel, the pairs being exactly the dense mask of
    any selection, plus 2 per channel for each gate dot product (query x complete earlier block)."""
    backend = _backend(d_model=32, block_size=block_size, top_k=top_k)
    q, k, _ = _qkv(batch=1, heads=1, n=n)
    pairs = int(
        selection_mask(
            select_blocks(q, block_key_sums(k, block_size), 0, block_size, top_k), block_size, n
        ).sum()
    )
    gate = sum(i // block_size for i in range(n))
    assert backend.attention_flops(n) == (4 * pairs + 2 * gate) * 32


# ---------------------------------------------------------------------------------------------
# GPU (the matmul kernel on CUDA against the CPU engine)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("alibi", [False, True], ids=["rope", "alibi"])
def test_cuda_engine_equals_cpu(alibi):
    q, k, v = _qkv(n=300, dim=16, dtype=torch.float32, grad=True)
    slopes = alibi_slopes(3) if alibi else None
    selected = select_blocks(q, block_key_sums(k.detach(), 32), 0, 32, 3)
    out = block_sparse_attention(q, k, v, selected, 32, slopes)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    cuda = [t.detach().cuda().requires_grad_() for t in (q, k, v)]
    cuda_selected = select_blocks(cuda[0], block_key_sums(cuda[1].detach(), 32), 0, 32, 3)
    assert torch.equal(cuda_selected.cpu(), selected)
    out_cuda = block_sparse_attention(
        *cuda, cuda_selected, 32, None if slopes is None else slopes.cuda()
    )
    torch.testing.assert_close(out_cuda.cpu(), out, rtol=1e-4, atol=1e-4)
    for got, want in zip(torch.autograd.grad(out_cuda, cuda, grad.cuda()), grads):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
