"""The linear-time family: linear, aft_full, aft_local, aft_simple, aft_conv, rwkv.

Each fast form is held against a plain reference written here (per-token loops or the dense
O(N^2) formula, fp64): the chunk-parallel forms for chunk sizes 1, 7, 16, 64 on lengths that are
not multiples of them, the recurrent (streaming) forms, and continuations from a non-zero state.
Then causality under extreme inputs, finiteness at N = 16384, constant streaming state, the
one-layer receptive field, bf16 against fp32, and the config errors.
"""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from conftest import model_config
from dispatch_count import DispatchCount
from omegaconf import open_dict

from longctx import build_model
from longctx.attention import aft, rwkv
from longctx.errors import ConfigError
from longctx.ops import segment_policy
from longctx.ops.aft import blocked
from longctx.ops.aft.blocked import aft_blocked
from longctx.ops.aft.reference import aft_one_query, prefix_after
from longctx.ops.linear import chunk as linear_chunk
from longctx.ops.linear.chunk import chunked_linear_attention
from longctx.ops.linear.reference import EPS, FEATURE_MAPS, recurrent_linear_attention
from longctx.ops.segment_policy import segment_length
from longctx.ops.wkv import chunk as wkv_chunk
from longctx.ops.wkv.chunk import wkv_chunked
from longctx.ops.wkv.reference import empty_wkv_state, wkv_recurrent

CHUNKS = (1, 7, 16, 64)
FP64 = dict(rtol=1e-10, atol=1e-10)
VOCAB = 37
FAMILY = ("linear", "aft_full", "aft_local", "aft_simple", "aft_conv", "rwkv")
SMALL_OPTIONS = {
    "linear": {"chunk_size": 8},
    "aft_full": {"max_len": 64},
    "aft_local": {"window": 5},
    "aft_simple": {},
    "aft_conv": {"kernel": 5},
    "rwkv": {},
}


@functools.cache
def _composed(name: str, overrides: tuple[str, ...]):
    return model_config(name, {}, *overrides)


def _config(name: str, options: dict, *overrides: str):
    """model_config with Hydra's composition done once per (backend, overrides): it dominates the
    cost of building these tiny models."""
    cfg = copy.deepcopy(_composed(name, overrides))
    with open_dict(cfg):
        for key, value in options.items():
            cfg.attention[key] = value
    return cfg


def _randn(*shape, scale=1.0, dtype=torch.float64, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=dtype) * scale).requires_grad_(grad)


def _grads(outputs, inputs, seed=99):
    """Gradients of a fixed random projection of `outputs` (one tensor or a tuple)."""
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outputs)
    return torch.autograd.grad(loss, inputs)


def _assert_all_close(xs, ys, **tol):
    for x, y in zip(xs, ys, strict=True):
        torch.testing.assert_close(x, y, **tol)


# --------------------------------------------------------------------------- references


def linear_reference(q, k, v, s, z):
    """Katharopoulos et al. with features q, k given: S += k v^T, z += k, o = q S / (q z + eps)."""
    outputs = []
    for t in range(q.shape[-2]):
        s = s + k[..., t, :, None] * v[..., t, None, :]
        z = z + k[..., t, :]
        num = (q[..., t, :, None] * s).sum(-2)
        outputs.append(num / ((q[..., t, :] * z).sum(-1, keepdim=True) + EPS))
    return torch.stack(outputs, -2), s, z


def wkv_reference(k, v, w, u):
    """RWKV-4's formula as written: sum_{i<t} e^{k_i - (t-1-i) w} v_i + e^{u + k_t} v_t,
    normalised."""
    outputs = []
    for t in range(k.shape[-2]):
        lags = torch.arange(t - 1, -1, -1, dtype=k.dtype)[:, None]
        past = torch.exp(k[..., :t, :] - lags * w[..., None, :])
        now = torch.exp(u + k[..., t, :])
        num = (past * v[..., :t, :]).sum(-2) + now * v[..., t, :]
        outputs.append(num / (past.sum(-2) + now))
    return torch.stack(outputs, -2)


def aft_reference(k, v, w):
    """AFT as written: softmax over t' <= t of K_t' + w[t, t'] per channel
    (w [Hb, N, N], -inf above)."""
    weights = torch.softmax(k[:, :, None] + w[:, :, :, None], dim=3)  # [B, H, t, t', D]
    return (weights * v[:, :, None]).sum(3)


def aft_bias_matrix(table, band):
    """The spec's w: learned `table` [Hb, N, N] for lag < band (all lags if None), 0 outside,
    -inf future."""
    n = table.shape[-1]
    lag = torch.arange(n)[:, None] - torch.arange(n)[None, :]
    w = table if band is None else table.masked_fill(lag >= band, 0.0)
    return w.masked_fill(lag < 0, float("-inf"))


def table_bias(table, offset=0):
    """A BiasFn reading w[t, t'] from `table` [Hb, N, N] for sequence indices starting at `offset`
    (rows of padding blocks clamped)."""
    last = table.shape[-1] - 1
    return lambda rows, cols: table[
        :, (rows + offset).clamp(max=last)[:, :, None], (cols + offset).clamp(max=last)[:, None, :]
    ]


# --------------------------------------------------------------------------- linear


@pytest.mark.parametrize("segments", ["one", "many"])
@pytest.mark.parametrize("feature", ["elu", "relu"])
def test_linear_chunked_and_recurrent_equal_the_loop(feature, segments, monkeypatch):
    if segments == "many":  # one chunk per kernel call: the state is carried between calls
        monkeypatch.setattr(linear_chunk, "HOST_SEGMENT_TENSOR_ELEMENTS", 1)
    phi = FEATURE_MAPS[feature][0]
    b, h, n, d = 2, 3, 45, 5
    q, k, v = (_randn(b, h, n, d, seed=i) for i in range(3))
    s0 = _randn(b, h, d, d + 1, seed=3).detach().abs().requires_grad_()  # (S | z) of earlier keys
    ref, s_ref, z_ref = linear_reference(phi(q), phi(k), v, s0[..., :d], s0[..., d])
    state_ref = torch.cat((s_ref, z_ref[..., None]), -1)
    inputs = (q, k, v, s0)
    grads_ref = _grads((ref, state_ref), inputs)
    forms = {
        f"chunk {c}": (lambda c=c: chunked_linear_attention(q, k, v, s0, c, feature))
        for c in CHUNKS
    }
    forms["recurrent"] = lambda: recurrent_linear_attention(q, k, v, s0, feature)
    for name, form in forms.items():
        out, state = form()
        torch.testing.assert_close(out, ref, **FP64, msg=name)
        torch.testing.assert_close(state, state_ref, **FP64, msg=name)
        _assert_all_close(_grads((out, state), inputs), grads_ref, **FP64)


def test_linear_mixer_continues_from_a_prefix_state():
    """step over a prefix (recurrent, one token), then the chunk form from that state == forward."""
    cfg = _config("linear", {"chunk_size": 4}, "model.n_layer=1")
    torch.manual_seed(0)
    mixer = build_model(cfg, VOCAB).double().blocks[0].mixer
    x = _randn(2, 23, cfg.model.d_model, grad=False)
    state = mixer.init_state(2)
    first, state = mixer.step(x[:, :1], state, 0)
    rest, state = mixer.step(x[:, 1:], state, 1)
    torch.testing.assert_close(torch.cat((first, rest), 1), mixer(x), **FP64)


# --------------------------------------------------------------------------- WKV (rwkv, aft_simple)


@pytest.mark.parametrize("segments", ["one", "many"])
@pytest.mark.parametrize("simple", [False, True], ids=["rwkv", "aft_simple"])
def test_wkv_chunked_and_recurrent_equal_the_formula(simple, segments, monkeypatch):
    if segments == "many":  # one chunk per pass: the state is carried between passes
        monkeypatch.setattr(wkv_chunk, "HOST_SEGMENT_TENSOR_ELEMENTS", 1)
    # The 73 positions after the history are a multiple of none of the chunk sizes (7, 16, 64):
    # every form ends on a partial chunk, and chunk 64 also carries a full chunk's state into it.
    b, h, n, d, history = 2, 3, 86, 4, 13
    k, v = _randn(b, h, n, d, seed=0), _randn(b, h, n, d, seed=1)
    if simple:
        w = u = torch.zeros(h, d, dtype=torch.float64, requires_grad=True)
    else:
        w = _randn(h, d, seed=2).detach().exp().requires_grad_()
        u = _randn(h, d, seed=3)
    ref = wkv_reference(k, v, w, u)
    params = (k, v) if simple else (k, v, w, u)
    grads_ref = _grads(ref[..., history:, :], params)
    tail = (k[..., history:, :], v[..., history:, :])
    forms = {f"chunk {c}": (lambda state, c=c: wkv_chunked(*tail, w, u, state, c)) for c in CHUNKS}
    forms["recurrent"] = lambda state: wkv_recurrent(*tail, w, u, state)
    finals = []
    for name, form in forms.items():
        # A non-zero state: the first `history` positions through the recurrence, then the form.
        empty = empty_wkv_state((b, h, d), k)
        head, state = wkv_recurrent(k[..., :history, :], v[..., :history, :], w, u, empty)
        torch.testing.assert_close(head, ref[..., :history, :], **FP64)
        out, final = form(state)
        torch.testing.assert_close(out, ref[..., history:, :], **FP64, msg=name)
        _assert_all_close(_grads(out, params), grads_ref, **FP64)
        finals.append(torch.exp(final[2]) * final[0])  # the state's value, whatever its scale
    for other in finals[1:]:
        torch.testing.assert_close(other, finals[0], **FP64)


# --------------------------------------------------------------------------- AFT (blocked engine)


@pytest.mark.parametrize("segments", ["one", "many", "recomputed"])
@pytest.mark.parametrize("band", [None, 1, 5, 40], ids=["full", "band1", "band5", "band40"])
def test_aft_blocked_equals_the_dense_formula(band, segments, monkeypatch):
    if segments != "one":  # one query block per segment: exercises the split windows
        monkeypatch.setattr(blocked, "SEGMENT_WORKSPACE_ELEMENTS", 1)
        # and either keeps every segment's intermediates or recomputes them in backward
        monkeypatch.setattr(blocked, "CHECKPOINT_AFTER", 10**6 if segments == "many" else 0)
    b, h, n, d = 2, 3, 29, 4
    k, v = _randn(b, h, n, d, seed=0), _randn(b, h, n, d, seed=1)
    table = _randn(h, n, n, seed=2)  # per-head bias, like aft_conv
    ref = aft_reference(k, v, aft_bias_matrix(table, band))
    grads_ref = _grads(ref, (k, v, table))
    empty = empty_wkv_state((b, h, d), k)
    # (block, base): pairwise only (1, 7), one and three dyadic levels (16, 64), and base blocks
    # that do not divide the block (16 / 3 -> 6 base blocks, padded to 8).
    for c, base in ((1, 8), (7, 8), (16, 8), (64, 8), (16, 3)):
        out = aft_blocked(k, v, table_bias(table), band, c, empty, base=base)
        torch.testing.assert_close(out, ref, **FP64, msg=f"block {c}, base {base}")
        _assert_all_close(_grads(out, (k, v, table)), grads_ref, **FP64)


@pytest.mark.parametrize("band", [None, 1, 5, 9], ids=["full", "band1", "band5", "band9"])
def test_aft_streaming_forms_continue_from_a_prefix_state(band):
    """Keys older than the band folded into a prefix state plus the cached band: the blocked form
    (several queries, every block size) and the one-query form (streaming decode) both match the
    dense formula, forward and backward. The gradients reach the keys and values that entered the
    prefix state or the cache, so they check the state's gradient too. The blocked form runs over
    79 - (cached keys that left the band) = 79, 68, 72, 76 positions: multiples of none of the
    block sizes 7, 16, 64, and more than one block of 64."""
    b, h, n, d, cached = 1, 2, 79, 3, 11
    k, v = _randn(b, h, n, d, seed=0), _randn(b, h, n, d, seed=1)
    table = _randn(1, n, n, seed=2)  # one bias for every channel, like aft_full / aft_local
    dense = lambda: aft_reference(k, v, aft_bias_matrix(table, band))  # noqa: E731 - a fresh graph per use
    ref = dense()
    grads_ref = _grads(ref[..., cached:, :], (k, v, table))
    empty = empty_wkv_state((b, h, d), k)
    keep = cached if band is None else min(cached, band - 1)
    leaving = cached - keep
    assert band is None or leaving > 0  # a non-empty prefix state whenever the band is bounded
    for c in CHUNKS:
        prefix = prefix_after(empty, k[..., :leaving, :], v[..., :leaving, :])
        recent = (k[..., leaving:, :], v[..., leaving:, :])
        assert all(recent[0].shape[-2] % size for size in CHUNKS[1:])
        out = aft_blocked(*recent, table_bias(table, leaving), band, c, prefix, keep)
        torch.testing.assert_close(out, ref[..., cached:, :], **FP64, msg=f"block {c}")
        _assert_all_close(_grads(out, (k, v, table)), grads_ref, **FP64)
    for t in (0, 4, 12, n - 1):
        lo = 0 if band is None else max(0, t - band + 1)
        prefix = prefix_after(empty, k[..., :lo, :], v[..., :lo, :])
        out = aft_one_query(
            k[..., lo : t + 1, :], v[..., lo : t + 1, :], table_bias(table, lo), prefix
        )
        torch.testing.assert_close(out[..., 0, :], ref[..., t, :], **FP64)
        grads = _grads(out[..., 0, :], (k, v, table))
        _assert_all_close(grads, _grads(dense()[..., t, :], (k, v, table)), **FP64)


def test_aft_local_is_not_windowed_attention():
    """Outside the window the bias is 0, not -inf: old keys still count with weight e^K."""
    b, h, n, d, window = 1, 1, 24, 3, 4
    k, v = _randn(b, h, n, d, seed=0, grad=False), _randn(b, h, n, d, seed=1, grad=False)
    table = _randn(1, n, n, seed=2, grad=False)
    out = aft_blocked(k, v, table_bias(table), window, 8, empty_wkv_state((b, h, d), k))
    torch.testing.assert_close(out, aft_reference(k, v, aft_bias_matrix(table, window)), **FP64)
    lag = torch.arange(n)[:, None] - torch.arange(n)[None, :]
    windowed = aft_bias_matrix(table, window).masked_fill(lag >= window, float("-inf"))
    assert (out - aft_reference(k, v, windowed)).abs().max() > 1e-2


# --------------------------------------------------------------------------- causality, extremes


def _kernels(n, d, key_scale, decay, device="cpu"):
    """Every kernel as f(k, v) -> outputs [1, 2, n, d] in fp32, with queries of size `key_scale`."""
    q = _randn(1, 2, n, d, scale=key_scale, dtype=torch.float32, seed=5, grad=False).to(device)
    w = torch.full((2, d), decay, device=device)
    u = torch.linspace(-3, 3, 2 * d, device=device).view(2, d)
    empty = empty_wkv_state((1, 2, d), q)
    s0 = torch.zeros(1, 2, d, d + 1, device=device)
    table = _randn(2, n, n, scale=3.0, dtype=torch.float32, seed=6, grad=False).to(device)
    return {
        "linear": lambda k, v: chunked_linear_attention(q, k, v, s0, 16)[0],
        "wkv": lambda k, v: wkv_chunked(k, v, w, u, empty, 16)[0],
        "wkv recurrent": lambda k, v: wkv_recurrent(k, v, w, u, empty)[0],
        "aft_simple": lambda k, v: wkv_chunked(k, v, 0 * w, 0 * u, empty, 16)[0],
        "aft banded": lambda k, v: aft_blocked(k, v, table_bias(table), 9, 8, empty),
        "aft full": lambda k, v: aft_blocked(k, v, table_bias(table), None, 8, empty),
    }


@pytest.mark.parametrize("decay", [1e-9, 0.5, 1e3], ids=["no-decay", "decay", "extreme-decay"])
def test_past_outputs_ignore_the_future_bitwise_under_extreme_inputs(decay):
    """Keys of +-50, decays near 0 and huge: changing positions > t changes no bit of outputs <= t,
    and the gradient of output t to every later input is exactly zero."""
    n, d = 50, 4
    k = _randn(1, 2, n, d, scale=50.0, dtype=torch.float32, seed=1, grad=False)
    v = _randn(1, 2, n, d, dtype=torch.float32, seed=2, grad=False)
    for name, kernel in _kernels(n, d, 50.0, decay).items():
        base = kernel(k, v)
        assert torch.isfinite(base).all(), name
        for t in (0, 7, 8, 16, 31, n - 2):
            k2, v2 = k.clone(), v.clone()
            k2[..., t + 1 :, :] = 60.0 * torch.sign(torch.randn(n - t - 1, d))  # huge future keys
            v2[..., t + 1 :, :] += 1e4
            changed = kernel(k2, v2)
            assert torch.equal(changed[..., : t + 1, :], base[..., : t + 1, :]), (
                f"{name}: leak into <= {t}"
            )
            kg, vg = k.clone().requires_grad_(), v.clone().requires_grad_()
            dk, dv = torch.autograd.grad(kernel(kg, vg)[..., t, :].sum(), (kg, vg))
            assert dk[..., t + 1 :, :].abs().max() == 0 and dv[..., t + 1 :, :].abs().max() == 0, (
                name
            )
            assert torch.isfinite(dk).all() and torch.isfinite(dv).all(), name


def test_long_sequences_stay_finite_forward_and_backward():
    """N = 16384 with keys of +-50 and both decay extremes: no inf or NaN anywhere (about 13 s:
    in the default set, because it is a Done-when of the linear family)."""
    n, d = 16384, 2
    k = _randn(1, 2, n, d, scale=50.0, dtype=torch.float32, seed=1)
    v = _randn(1, 2, n, d, dtype=torch.float32, seed=2)
    for decay in (1e-9, 1e3):
        for name, kernel in _kernels(n, d, 50.0, decay).items():
            if name in ("wkv recurrent", "aft full"):
                continue  # the per-token loop and the O(N^2) form are checked at length 50
            out = kernel(k, v)
            dk, dv = torch.autograd.grad(out.sum(), (k, v))
            assert (
                torch.isfinite(out).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
            ), name


# --------------------------------------------------------------------------- model level


def _model(name, options=None, *overrides, dtype=torch.float64, seed=0):
    cfg = _config(name, SMALL_OPTIONS[name] if options is None else options, *overrides)
    cfg.context_length = max(cfg.context_length, 64)
    torch.manual_seed(seed)
    model = build_model(cfg, VOCAB).to(dtype).eval()
    _randomise_position_biases(model)
    return model


def _randomise_position_biases(model):
    """AFT biases start at 0; give them values of size ~1 so the tests see the learned-bias paths
    (aft_full's factors are scaled so that w = U V^T has unit variance)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (aft.FullAFT, aft.LocalAFT, aft.ConvAFT)):
                scale = aft.FULL_RANK**-0.25 if isinstance(module, aft.FullAFT) else 1.0
                for p in module.parameters(recurse=False):
                    p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * scale)


def _ids(n, batch=2, seed=1):
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", FAMILY)
def test_streaming_with_learned_biases_equals_forward(name):
    """Chunked step() from a growing state == forward, with non-zero AFT position biases."""
    model = _model(name)
    ids = _ids(29)
    with torch.no_grad():
        reference = model(ids)
        state, outputs = model.init_state(2), []
        for lo, hi in ((0, 1), (1, 10), (10, 11), (11, 29)):
            logits, state = model.step(ids[:, lo:hi], state)
            outputs.append(logits)
    torch.testing.assert_close(torch.cat(outputs, 1), reference, **FP64)


@pytest.mark.parametrize("name", FAMILY)
def test_one_layer_receptive_field_is_every_past_position(name):
    """One layer: changing token j changes the logits at i exactly when j <= i (all the past)."""
    model = _model(name, None, "model.n_layer=1")
    n = 21
    ids = _ids(n, batch=1)
    perturbed = ids.repeat(n, 1)  # row j changes token j
    perturbed[range(n), range(n)] = (perturbed[range(n), range(n)] + 1) % VOCAB
    with torch.no_grad():
        changed = (model(perturbed) != model(ids)).any(-1).T  # [i, j]
    assert torch.equal(changed, torch.ones(n, n, dtype=torch.bool).tril())


@pytest.mark.parametrize("name", FAMILY)
def test_project_and_mix_compose_to_forward(name):
    model = _model(name, None, "model.n_layer=1")
    mixer = model.blocks[0].mixer
    x = _randn(2, 19, model.dims.d_model, grad=False)
    merged = mixer.mix(*mixer.project(x)).transpose(1, 2).flatten(2)
    torch.testing.assert_close(mixer.out(merged), mixer(x), **FP64)


def spec_aft_bias(name, mixer, options, n):
    """The spec's pairwise bias w[t, t'] ([Hb, n, n]; -inf for t' > t), written from the mixer's own
    parameters and the config's options (not the mixer's copies of them):
    - aft_full: the learned pairwise bias, factorised w = U V^T;
    - aft_local: the learned w[t, t'] (stored by lag t - t') inside the window, exactly 0 outside;
    - aft_conv: one causal kernel of length `kernel` per head, a function of t - t' only, 0 outside.
    """
    t, s = torch.arange(n)[:, None], torch.arange(n)[None, :]
    lag = t - s
    if name == "aft_full":
        w = (mixer.u[:n] @ mixer.v[:n].T)[None]
    elif name == "aft_local":
        inside = (lag >= 0) & (lag < options["window"])
        w = torch.where(inside, mixer.w[t, lag.clamp(0, options["window"] - 1)], 0.0)[None]
    else:
        inside = (lag >= 0) & (lag < options["kernel"])
        w = torch.where(inside, mixer.w[:, lag.clamp(0, options["kernel"] - 1)], 0.0)
    return w.masked_fill(lag < 0, float("-inf"))


@pytest.mark.parametrize("name", ["aft_full", "aft_local", "aft_conv"])
def test_aft_mixers_compute_the_spec_formula_with_their_learned_bias(name):
    """A model's AFT mixer (forward, streamed step() chunks, and gradients to the input and every
    parameter) equals the dense O(N^2) formula Y_t = sigmoid(Q_t) * sum_{t'<=t} e^{K_t' + w[t,t']}
    V_t' / sum_{t'<=t} e^{K_t' + w[t,t']} with w built from the mixer's parameters as
    docs/attention.md defines it per variant. The engine tests feed it a given table; this holds
    each mixer's `bias_for` (indexing, lag direction, window/kernel from the config, 0 not -inf
    outside) to it. Window/kernel 5 over 45 positions: most pairs lie outside it."""
    model = _model(name, None, "model.n_layer=1")
    mixer, options = model.blocks[0].mixer, SMALL_OPTIONS[name]
    with torch.no_grad():  # projections large enough that K and V matter next to the bias
        mixer.qkv.weight.copy_(_randn(*mixer.qkv.weight.shape, scale=0.3, seed=4, grad=False))
    b, n, heads = 2, 45, model.dims.n_head
    x = _randn(b, n, model.dims.d_model, seed=5)
    q, k, v = (t.transpose(1, 2) for t in mixer.qkv(x).unflatten(-1, (3, heads, -1)).unbind(2))
    w = spec_aft_bias(name, mixer, options, n)  # [Hb, t, t']
    weights = torch.softmax(k[:, :, None] + w[None, :, :, :, None], dim=3)  # [B, H, t, t', Dh]
    mean = (weights * v[:, :, None]).sum(3)
    expected = mixer.out((torch.sigmoid(q) * mean).transpose(1, 2).flatten(2))
    inputs = (x, *mixer.parameters())
    torch.testing.assert_close(mixer(x), expected, **FP64)
    _assert_all_close(_grads(mixer(x), inputs), _grads(expected, inputs), **FP64)
    state, outputs = mixer.init_state(b), []
    with torch.no_grad():
        for lo, hi in ((0, 1), (1, 10), (10, 11), (11, n)):
            out, state = mixer.step(x[:, lo:hi], state, lo)
            outputs.append(out)
    torch.testing.assert_close(torch.cat(outputs, 1), expected.detach(), **FP64)


@pytest.mark.parametrize("name", ["linear", "aft_simple", "rwkv"])
def test_state_size_is_the_same_after_16_and_16384_tokens(name):
    model = _model(name, None, "model.n_layer=1", "context_length=16384", dtype=torch.float32)
    ids = _ids(16384, batch=1)
    with torch.no_grad():
        _, state = model.step(ids[:, :16], model.init_state(1))
        early = sum(t.numel() for t in _tensors(state))
        _, state = model.step(ids[:, 16:], state)
    assert sum(t.numel() for t in _tensors(state)) == early


def _tensors(state):
    if isinstance(state, torch.Tensor):
        yield state
    elif isinstance(state, dict):
        for value in state.values():
            yield from _tensors(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from _tensors(value)


@pytest.mark.parametrize("name", FAMILY)
def test_bf16_matches_fp32_and_keeps_fp32_state(name):
    """bf16 weights and activations: logits within bf16 tolerance of the fp32 model; the recurrent
    sums stay fp32. Tolerance: 5e-2 absolute on logits of size ~1 (bf16 has 8 mantissa bits and
    the error compounds over projections, norms and the head)."""
    reference = _model(name, dtype=torch.float32)
    model = _model(name, dtype=torch.bfloat16)
    ids = _ids(29)
    with torch.no_grad():
        expected = reference(ids)
        got = model(ids).float()
        _, state = model.step(ids, model.init_state(2))
    torch.testing.assert_close(got, expected, rtol=0, atol=5e-2)
    mixer_states = [layer[0] for layer in state["layers"]]
    if name in ("aft_full", "aft_local", "aft_conv"):
        sums = [t for s in mixer_states for t in s["prefix"]]  # the cache holds bf16 keys/values
    elif name == "rwkv":
        sums = [t for s in mixer_states for t in s[1]]  # (a, b, p); the shift inputs are bf16
    else:
        sums = list(_tensors(mixer_states))
    assert sums and all(t.dtype == torch.float32 for t in sums)


# --------------------------------------------------------------------------- RWKV specifics


def test_rwkv_init_follows_the_reference_ramps():
    cfg = _config("rwkv", {}, "model.n_layer=3", "model.d_model=64")
    model = build_model(cfg, VOCAB)
    first, last = model.blocks[0].mixer, model.blocks[2].mixer
    torch.testing.assert_close(first.time_decay[[0, -1]], torch.tensor([-5.0, 3.0]))
    channel = torch.arange(64) / 63
    torch.testing.assert_close(first.time_decay, -5 + 8 * channel**0.7)  # layer 0: exponent 0.7
    torch.testing.assert_close(last.time_decay, -5 + 8 * channel**2.0)  # last layer: 0.7 + 1.3
    zigzag = torch.tensor([((i + 1) % 3) - 1 for i in range(64)]) * 0.5
    torch.testing.assert_close(first.time_first, math.log(0.3) + zigzag)
    ramp = torch.arange(64) / 64
    torch.testing.assert_close(first.time_mix_k, ramp**1.0)
    torch.testing.assert_close(last.time_mix_v, ramp ** (1 - 2 / 3) + 0.3)
    torch.testing.assert_close(last.time_mix_r, ramp ** (0.5 * (1 - 2 / 3)))
    assert all(isinstance(block.ffn, rwkv.ChannelMix) for block in model.blocks)


# --------------------------------------------------------------------------- config and costs


@pytest.mark.parametrize(
    ("name", "options", "words"),
    [
        ("linear", {"feature_map": "softplus"}, "feature_map"),
        ("linear", {"chunk_size": 0}, "chunk_size"),
        ("rwkv", {"version": 7}, "version=4"),
        ("aft_local", {"window": 0}, "window"),
        ("aft_conv", {"kernel": 0}, "kernel"),
        ("aft_full", {"max_len": 0}, "max_len"),
    ],
)
def test_impossible_options_are_refused_at_build_time(name, options, words):
    with pytest.raises(ConfigError, match=words):
        build_model(_config(name, options), VOCAB)


@pytest.mark.parametrize("name", ["aft_full", "aft_local"])
def test_sequences_past_max_len_are_refused(name):
    model = build_model(_config(name, {"max_len": 16}), VOCAB)
    model(_ids(16))
    with pytest.raises(ConfigError, match="max_len"):
        model(_ids(17))
    _, state = model.step(_ids(10), model.init_state(2))
    with pytest.raises(ConfigError, match="max_len"):
        model.step(_ids(7), state)


def test_attention_flops_scale_linearly_except_aft_full():
    for name in FAMILY:
        backend = build_model(_config(name, {}), VOCAB).backend
        ratio = backend.attention_flops(16384) / backend.attention_flops(4096)
        if name == "aft_full":
            assert 14 < ratio <= 16.5, name
        else:
            assert 3.9 < ratio < 4.5, name


# --------------------------------------------------------------------------- device work


def test_segments_are_capped_only_in_host_memory():
    """Host memory: equal segments of whole chunks within the cap; a caching device allocator
    (CUDA's): one pass over the whole sequence, whatever its size."""
    host, cuda = torch.device("cpu"), torch.device("cuda")
    assert segment_length(8192, 6240, 64, 1 << 19, host) == 64  # the 128 segments of issue 22
    assert segment_length(1000, 10, 16, 800, host) == 80  # 13 equal segments of 5 chunks
    assert segment_length(8192, 6240, 64, 1 << 19, cuda) == 8192
    assert segment_length(1000, 10, 16, 800, cuda) == 1008


def _training_step_count(name, n, segments_capped, monkeypatch):
    """Ops a tiny model's forward, loss and backward dispatch with kernel=torch, under the
    segment policy of host memory (capped) or of a caching device allocator (one pass)."""
    monkeypatch.setattr(segment_policy, "caps_segments", lambda device: segments_capped)
    monkeypatch.setattr(linear_chunk, "HOST_SEGMENT_TENSOR_ELEMENTS", 1 << 12)
    monkeypatch.setattr(wkv_chunk, "HOST_SEGMENT_TENSOR_ELEMENTS", 1 << 12)
    cfg = _config(name, {**SMALL_OPTIONS[name], "kernel": "torch"}, "model.n_layer=1")
    cfg.context_length = max(cfg.context_length, n)
    if name in ("aft_full", "aft_local"):
        cfg.attention.max_len = n
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB)
    ids = _ids(n)
    with DispatchCount() as count:
        logits = model(ids)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    return count


@pytest.mark.parametrize("capped", [True, False], ids=["host-segments", "one-pass"])
@pytest.mark.parametrize("name", FAMILY)
def test_torch_kernels_make_no_host_sync(name, capped, monkeypatch):
    """A training step of every backend of the family on its torch kernels dispatches no
    aten._local_scalar_dense (no .item(), no value-dependent shape): on CUDA nothing waits for
    the device. 130 positions: several segments under the host policy, several AFT blocks."""
    count = _training_step_count(name, 130, capped, monkeypatch)
    assert count.host_syncs == 0


@pytest.mark.parametrize("name", ["linear", "rwkv"])
def test_one_pass_dispatches_what_segments_multiply(name, monkeypatch):
    """Under the one-pass policy the torch kernels of linear and rwkv dispatch no op per segment:
    linear's count is the same at every length, rwkv's grows only by the log-depth scan's levels.
    Under host segments it grows with the number of segments."""
    one_pass = [_training_step_count(name, n, False, monkeypatch).total() for n in (64, 512)]
    segmented = [_training_step_count(name, n, True, monkeypatch).total() for n in (64, 512)]
    if name == "linear":
        assert one_pass[0] == one_pass[1]
    assert one_pass[1] - one_pass[0] < (segmented[1] - segmented[0]) / 4


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernels_agree_on_cuda():
    n, d = 300, 8
    k = _randn(1, 2, n, d, scale=5.0, dtype=torch.float32, seed=1, grad=False)
    v = _randn(1, 2, n, d, dtype=torch.float32, seed=2, grad=False)
    on_gpu = _kernels(n, d, 5.0, 0.5, "cuda")
    for name, kernel in _kernels(n, d, 5.0, 0.5).items():
        torch.testing.assert_close(
            on_gpu[name](k.cuda(), v.cuda()).cpu(), kernel(k, v), rtol=1e-4, atol=1e-4
        )
