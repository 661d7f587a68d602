"""flash-linear-attention's Triton kernels behind `attention.kernel=fla` (linear, rwkv), held to the
project's references.

On a CUDA machine the kernels run compiled; elsewhere they run under Triton's interpreter on CPU
tensors (tests/fla_interpreter.py: TRITON_INTERPRET=1 and two shims), in fp32 on small shapes.
What is checked, forward and backward: the project's exact calls (longctx/ops/{linear,wkv}/fla.py)
against the project's references (the per-token recurrences), the raw sums of fla's linear kernel
against fla's own naive forms, extreme inputs and causality, whole models with `kernel=fla`
against `kernel=torch` (training and streaming), and what a training step asks of the device:
no host sync, and a number of ops and launches that does not grow with the length.

Marked `fla` (the [interpret] extra installs fla-core and triton). Without them the module is
skipped, except under CI, where a skip would hide a missing install step.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import model_config
from dispatch_count import DispatchCount
from fla_interpreter import INSTALL_HINT, load_fla, missing_packages

from longctx import build_model
from longctx.ops.linear.fla import fla_linear_attention
from longctx.ops.linear.reference import EPS, FEATURE_MAPS, recurrent_linear_attention
from longctx.ops.wkv.fla import fla_wkv
from longctx.ops.wkv.reference import empty_wkv_state, wkv_recurrent

pytestmark = [
    pytest.mark.fla,
    pytest.mark.filterwarnings("ignore:Triton is not supported on current platform"),
]

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The interpreter computes in numpy fp32, like the fp32 torch kernels. Compiled on CUDA, Triton's
# dots on fp32 inputs run in TF32 (10 mantissa bits) by default.
TOL = dict(rtol=2e-4, atol=2e-5) if DEVICE.type == "cpu" else dict(rtol=1e-2, atol=2e-3)
VOCAB = 37


@pytest.fixture(scope="module", autouse=True)
def fla_kernels():
    missing = missing_packages()
    if missing:
        message = f"{missing} not installed ({INSTALL_HINT})"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the fla tests: {message}")
        pytest.skip(message)
    load_fla(DEVICE)


def _randn(*shape, scale=1.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=dtype) * scale).to(DEVICE).requires_grad_()


def _grads(outputs, inputs, seed=99):
    """Gradients of a fixed random projection of `outputs` (a tensor or a tuple of them); the
    projection is the same whatever the outputs' dtype and device."""
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outputs]
    loss = sum((o * w.to(o)).sum() for o, w in zip(outputs, weights))
    return torch.autograd.grad(loss, inputs)


def _fp64(tensors):
    return [t.detach().double().cpu().requires_grad_() for t in tensors]


def _assert_close(got, expected, what):
    for i, (x, y) in enumerate(zip(got, expected, strict=True)):
        try:
            torch.testing.assert_close(x.double().cpu(), y.double().cpu(), **TOL)
        except AssertionError as error:
            raise AssertionError(f"{what} {i}: {error}") from None


# --------------------------------------------------------------------------- linear


@pytest.mark.parametrize(
    ("n", "feature", "carried"), [(45, "elu", False), (45, "relu", True), (130, "elu", True)]
)
def test_fla_linear_equals_the_reference(n, feature, carried):
    """fla_linear_attention == the per-token recurrence (fp64), outputs, final state and the
    gradients of q, k, v and the entering state, on lengths that are not multiples of fla's 64
    and with Dv != Dk (the ones column is the normaliser's)."""
    b, h, dk, dv = 2, 3, 8, 5
    q, k, v = _randn(b, h, n, dk, seed=0), _randn(b, h, n, dk, seed=1), _randn(b, h, n, dv, seed=2)
    s0 = _randn(b, h, dk, dv + 1, seed=3).detach().abs().requires_grad_() if carried else None
    inputs = [q, k, v] + ([s0] if carried else [])
    out, state = fla_linear_attention(q, k, v, s0, feature)

    ref_inputs = _fp64(inputs)
    zeros = torch.zeros(b, h, dk, dv + 1, dtype=torch.float64)
    ref_out, ref_state = recurrent_linear_attention(
        *ref_inputs[:3], ref_inputs[3] if carried else zeros, feature
    )
    _assert_close((out, state), (ref_out, ref_state), "forward")
    _assert_close(_grads((out, state), inputs), _grads((ref_out, ref_state), ref_inputs), "grad")


def test_fla_linear_call_equals_fla_naive_forms(monkeypatch):
    """The exact chunk_linear_attn call the project makes (captured), against fla's own naive
    recurrent and chunk forms on the same arguments; and the project's output is the last column's
    normalisation of those sums with eps = 1e-6, not fla's 1e-10."""
    from fla.ops.linear_attn import chunk as fla_chunk
    from fla.ops.linear_attn import naive

    calls = []
    original = fla_chunk.chunk_linear_attn

    def recording(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append((args, kwargs, result))
        return result

    monkeypatch.setattr("fla.ops.linear_attn.chunk_linear_attn", recording)
    b, h, n, d = 2, 2, 128, 8  # a multiple of 64: fla's naive chunk form needs one
    q, k, v = (_randn(b, h, n, d, seed=i) for i in range(3))
    out, _ = fla_linear_attention(q, k, v, None)
    ((args, kwargs, (sums, final)),) = calls
    assert kwargs["scale"] == 1.0 and kwargs["normalize"] is False
    features_q, features_k, values = (t.detach() for t in args)
    torch.testing.assert_close(values[..., -1], torch.ones_like(values[..., -1]))

    naive_sums, naive_state = naive.naive_recurrent_linear_attn(
        features_q, features_k, values, scale=1.0, output_final_state=True
    )
    _assert_close((sums, final), (naive_sums, naive_state), "naive recurrent")
    chunk_sums = naive.naive_chunk_linear_attn(features_q, features_k, values, scale=1.0)
    _assert_close((sums,), (chunk_sums,), "naive chunk")
    normalised = naive_sums[..., :-1] / (naive_sums[..., -1:] + EPS)
    _assert_close((out,), (normalised.transpose(1, 2),), "eps")


# --------------------------------------------------------------------------- rwkv (WKV)


def _wkv_inputs(n, key_scale=1.0, log_decay=None, seed=0):
    b, h, d = 2, 3, 4
    k = _randn(b, h, n, d, scale=key_scale, seed=seed)
    v = _randn(b, h, n, d, seed=seed + 1)
    if log_decay is None:
        log_decay = _randn(h, d, seed=seed + 2)
    u = _randn(h, d, seed=seed + 3)
    return k, v, log_decay, u


@pytest.mark.parametrize("history", [0, 9], ids=["fresh", "carried-state"])
def test_fla_wkv_equals_the_reference(history):
    """fla_wkv == the stable recurrence (fp64) from an empty state and from the state left by
    `history` positions: outputs, the final state's value e^p (a, b), and the gradients of k, v,
    the log-decay and the bonus (through the carried state as well)."""
    k, v, log_decay, u = _wkv_inputs(30)
    b, h, _, d = k.shape

    def run(form, k, v, log_decay, u):
        state, outputs = empty_wkv_state((b, h, d), k), []
        if history:  # the state after the first positions, through the recurrence
            head, state = wkv_recurrent(
                *(x[..., :history, :] for x in (k, v)), log_decay.exp(), u, state
            )
            outputs.append(head)
        tail = (k[..., history:, :], v[..., history:, :])
        if form == "fla":
            y, final = fla_wkv(*tail, log_decay, u, state if history else None)
        else:
            y, final = wkv_recurrent(*tail, log_decay.exp(), u, state)
        a, b_, p = final
        return torch.cat((*outputs, y), -2), torch.exp(p) * a, torch.exp(p) * b_

    inputs = [k, v, log_decay, u]
    ref_inputs = _fp64(inputs)
    got, expected = run("fla", *inputs), run("reference", *ref_inputs)
    _assert_close(got, expected, "forward")
    _assert_close(_grads(got[0], inputs), _grads(expected[0], ref_inputs), "grad")


def _linear_from_features(fq, fk, v):
    """Normalised linear attention of given features, summed in fp64 (the formula as written).
    With queries of +-50 the fp32 features elu(q) + 1 of q < -17 round to exactly 0 in every form
    of the package (elu's e^q - 1 is -1 in fp32); the kernels are held to these fp32 features."""
    fq, fk, v = (x.double().cpu() for x in (fq, fk, v))
    scores = torch.einsum("bhtd,bhsd->bhts", fq, fk).tril()
    return (scores @ v) / (scores.sum(-1, keepdim=True) + EPS)


def _assert_causal(kernel, k, v, positions, name):
    """Changing the inputs after t changes no bit of the outputs up to t, and the gradient of
    output t to every later input is exactly zero."""
    base = kernel(k, v)
    for t in positions:
        k2, v2 = k.detach().clone(), v.detach().clone()
        k2[..., t + 1 :, :] = 60.0
        v2[..., t + 1 :, :] += 1e4
        assert torch.equal(kernel(k2, v2)[..., : t + 1, :], base[..., : t + 1, :]), f"{name}: {t}"
        dk, dv = torch.autograd.grad(base[..., t, :].sum(), (k, v), retain_graph=True)
        assert dk[..., t + 1 :, :].abs().max() == 0 and dv[..., t + 1 :, :].abs().max() == 0, name
        assert torch.isfinite(dk).all() and torch.isfinite(dv).all(), name
    return base


def test_fla_linear_under_extreme_inputs_is_exact_and_causal():
    """Queries and keys of +-50: outputs equal the formula on the same fp32 features, and stay
    causal inside a chunk (t = 31), at its last position (63) and across chunks (64)."""
    k, v, _, _ = _wkv_inputs(80, key_scale=50.0)
    q = _randn(*k.shape, scale=50.0, seed=9).detach()
    phi = FEATURE_MAPS["elu"][0]
    out = _assert_causal(
        lambda k, v: fla_linear_attention(q, k, v, None)[0], k, v, (31, 63, 64), "linear"
    )
    expected = _linear_from_features(*(phi(x.detach()) for x in (q, k)), v.detach())
    assert torch.isfinite(out).all()
    _assert_close((out,), (expected,), "linear")


@pytest.mark.parametrize("decay", [1e-9, 1e3], ids=["no-decay", "extreme-decay"])
def test_fla_wkv_under_extreme_inputs_is_exact_and_causal(decay):
    """Keys of +-50 with decays near 0 or huge: outputs finite, equal to the stable recurrence
    (fp64), and causal. (fla's RWKV-4 kernel steps through the positions one by one, so a short
    sequence covers it; under the interpreter every step is interpreted Python.)"""
    k, v, _, u = _wkv_inputs(24, key_scale=50.0)
    log_decay = torch.full((3, k.shape[-1]), float(torch.tensor(decay).log()), device=DEVICE)
    out = _assert_causal(lambda k, v: fla_wkv(k, v, log_decay, u, None)[0], k, v, (0, 11), "wkv")
    cpu = [x.detach().double().cpu() for x in (k, v, log_decay, u)]
    expected = wkv_recurrent(
        *cpu[:2], cpu[2].exp(), cpu[3], empty_wkv_state(k.shape[:2] + k.shape[3:], cpu[0])
    )[0]
    assert torch.isfinite(out).all()
    _assert_close((out,), (expected,), "wkv")


# --------------------------------------------------------------------------- models


def _models(name, **options):
    """The same tiny model (fp32, one per kernel) with kernel=fla and kernel=torch."""
    models = {}
    for kernel in ("fla", "torch"):
        cfg = model_config(name, {**options, "kernel": kernel})
        torch.manual_seed(0)
        models[kernel] = build_model(cfg, VOCAB).to(DEVICE)
    return models


# Model lengths: past one of fla's 64-position chunks for linear; short for rwkv, whose fla kernel
# steps through the positions one by one (interpreted Python per step on the CPU).
LENGTHS = {"linear": 70, "rwkv": 20}


def _ids(n, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, n), generator=g).to(DEVICE)


@pytest.mark.parametrize("name", ["linear", "rwkv"])
def test_models_train_the_same_with_either_kernel_and_fla_never_syncs(name):
    """Logits and the gradient of every parameter: kernel=fla == kernel=torch. The fla step
    (forward, loss, backward) dispatches no aten._local_scalar_dense: nothing waits for the
    device."""
    models = _models(name)
    ids = _ids(LENGTHS[name])
    grads, counts = {}, {}
    for kernel, model in models.items():
        with DispatchCount() as counts[kernel]:
            logits = model(ids)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())
            grads[kernel] = (logits, *torch.autograd.grad(loss, list(model.parameters())))
    _assert_close(grads["fla"], grads["torch"], f"{name} logits, then parameter grads")
    assert counts["fla"].host_syncs == 0, counts["fla"].ops
    assert sum(counts["fla"].launches.values()) > 0  # fla's kernels did run


@pytest.mark.parametrize("name", ["linear", "rwkv"])
def test_fla_streaming_equals_forward(name):
    """step() in chunks (fla for every chunk longer than one token, the recurrence for single
    tokens) == forward with fla: the carried state is the same in every form."""
    model = _models(name)["fla"].eval()
    n = LENGTHS[name]
    ids = _ids(n)
    with torch.no_grad():
        reference = model(ids)
        state, outputs = model.init_state(2), []
        for lo, hi in ((0, 1), (1, n // 2), (n // 2, n // 2 + 1), (n // 2 + 1, n)):
            logits, state = model.step(ids[:, lo:hi], state)
            outputs.append(logits)
    _assert_close((torch.cat(outputs, 1),), (reference,), "streaming")


def _block_step(name, batch, n):
    """aten ops and Triton launches of one block's training step (forward, backward) with
    kernel=fla at d_model 64."""
    cfg = model_config(name, {"kernel": "fla"}, "model.n_layer=1")
    torch.manual_seed(0)
    block = build_model(cfg, VOCAB).to(DEVICE).blocks[0]
    x = _randn(batch, n, cfg.model.d_model)
    if DEVICE.type == "cuda":  # autotuning's first call runs every config: count a later step
        block(x).sum().backward()
    with DispatchCount() as count:
        block(x).sum().backward()
    return count


@pytest.mark.parametrize("name", ["linear", "rwkv"])
def test_ops_and_launches_per_block_step_do_not_grow_with_length(name):
    """The device work is in fla's kernels: a block step dispatches the same aten ops and Triton
    launches at every length and batch (what the bench's kernel_launches counts at 8K)."""
    n = LENGTHS[name]
    short, long = _block_step(name, 1, n), _block_step(name, 2, 2 * n + 3)
    assert short.ops == long.ops and short.launches == long.launches
    assert short.host_syncs == 0
