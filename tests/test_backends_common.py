"""Properties every backend must have, run over the shared table in backend_cases.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from backend_cases import CASES
from conftest import CONF_DIR, model_config
from omegaconf import OmegaConf

from longctx import build_model
from longctx.attention import available_backends, backend_class

VOCAB = 37
NAMES = sorted(CASES)


def _model(name: str, dtype=torch.float64, seed: int = 0, **extra):
    case = CASES[name]
    cfg = model_config(name, case["options"], *case.get("model", ()), *extra.get("overrides", ()))
    cfg.context_length = max(cfg.context_length, case["seq_len"])
    torch.manual_seed(seed)
    return build_model(cfg, VOCAB).to(dtype).eval()


def _ids(n: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def _state_numel(state) -> int:
    if isinstance(state, torch.Tensor):
        return state.numel()
    if isinstance(state, dict):
        return sum(_state_numel(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_state_numel(v) for v in state)
    return 0


def test_every_backend_is_in_the_table():
    assert sorted(available_backends()) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_yaml_lists_the_spec_defaults(name):
    """conf/attention/<name>.yaml shows exactly the options and defaults the code uses."""
    yaml = OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "attention" / f"{name}.yaml"))
    assert yaml.pop("name") == name
    if not isinstance(yaml.get("kernel"), int):  # aft_conv's `kernel` is its causal kernel length
        assert yaml.pop("kernel") == "auto"
    defaults = {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(backend_class(name).Options)
    }
    defaults = {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()}
    assert yaml == defaults


@pytest.mark.parametrize("name", NAMES)
def test_every_layer_equals_its_reference(name):
    """Each layer's output and gradients (inputs and weights) against the table's naive form of
    the backend (backend_references.py), fp64, random inputs, every layer of the model."""
    case = CASES[name]
    model = _model(name)
    for layer, block in enumerate(model.blocks):
        mixer = block.mixer
        x = torch.randn(
            2,
            case["seq_len"],
            model.dims.d_model,
            dtype=torch.float64,
            generator=torch.Generator().manual_seed(layer),
        ).requires_grad_()
        weights = torch.randn(
            x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9)
        )
        leaves = [x, *(p for p in mixer.parameters() if p.requires_grad)]
        results = []
        for out in (mixer(x), case["reference"](mixer, x, layer, case["options"])):
            results.append((out, *torch.autograd.grad((out * weights).sum(), leaves)))
        for index, (got, want) in enumerate(zip(*results)):
            torch.testing.assert_close(
                got, want, rtol=1e-8, atol=1e-8, msg=f"layer {layer}, #{index}"
            )


@pytest.mark.parametrize("name", NAMES)
def test_chunked_step_equals_forward(name):
    case = CASES[name]
    model = _model(name)
    n = case["seq_len"]
    ids = _ids(n)
    with torch.no_grad():
        reference = model(ids)
        for chunks in case.get("chunks", [[1] * n, [5, 1, 13, n], [n]]):
            state, outputs, start = model.init_state(ids.shape[0]), [], 0
            for size in chunks:
                if start >= n:
                    break
                logits, state = model.step(ids[:, start : start + size], state)
                outputs.append(logits)
                start += size
            torch.testing.assert_close(torch.cat(outputs, 1), reference, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_future_tokens_never_change_past_logits(name):
    model = _model(name, dtype=torch.float32)
    n = CASES[name]["seq_len"]
    ids = _ids(n)
    with torch.no_grad():
        base = model(ids)
        for t in (0, n // 3, n - 2):
            changed = ids.clone()
            changed[:, t + 1 :] = (changed[:, t + 1 :] + 1 + torch.arange(n - t - 1)) % VOCAB
            assert torch.equal(model(changed)[:, : t + 1], base[:, : t + 1]), (
                f"leak into position <= {t}"
            )


@pytest.mark.parametrize("name", NAMES)
def test_zero_gradient_to_the_future(name):
    model = _model(name)
    n = CASES[name]["seq_len"]
    captured = {}

    def keep_embeddings(module, inputs, output):
        output.retain_grad()
        captured["x"] = output

    model.embed.register_forward_hook(keep_embeddings)
    i = n // 2
    model(_ids(n))[:, i].sum().backward()
    grad = captured["x"].grad
    assert grad[:, i + 1 :].abs().max() == 0
    assert grad[:, : i + 1].abs().sum() > 0


@pytest.mark.parametrize("name", [n for n in NAMES if CASES[n]["state"] != "grows"])
def test_streaming_state_does_not_grow(name):
    model = _model(name, dtype=torch.float32, overrides=["context_length=4096"])
    state = model.init_state(1)
    sizes = {}
    with torch.no_grad():
        for start in range(0, 4096, 256):
            _, state = model.step(_ids(256, batch=1, seed=start), state)
            sizes[start + 256] = _state_numel(state)
    if CASES[name]["state"] == "constant":
        assert sizes[4096] == sizes[256]
    assert sizes[4096] <= sizes[1024]


@pytest.mark.parametrize("name", NAMES)
def test_bf16_forward_and_backward_are_finite(name):
    model = _model(name, dtype=torch.bfloat16).train()
    logits = model(_ids(CASES[name]["seq_len"]))
    logits.float().logsumexp(-1).mean().backward()
    assert torch.isfinite(logits).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def _loss_and_grads(model, ids):
    params = [p for p in model.parameters() if p.requires_grad]
    logits = model(ids)
    weights = torch.randn(
        logits.shape, dtype=logits.dtype, generator=torch.Generator().manual_seed(3)
    )
    return (logits, *torch.autograd.grad((logits * weights).sum(), params))


@pytest.mark.parametrize("checkpointing", ["none", "blocks"])
@pytest.mark.parametrize("name", NAMES)
def test_heads_split_across_threads_equal_one_thread(name, checkpointing, monkeypatch):
    """With the CPU kernels' heads split across 2 threads (longctx.ops.head_parallel, forced at
    this size), logits and every parameter's gradient equal the one-thread run, with the kept
    graphs and, under activation checkpointing, with the recomputed groups. Every backend with a
    torch kernel of its own goes through the split."""
    from longctx.ops import head_parallel

    model = _model(name, overrides=(f"model.activation_checkpointing={checkpointing}",))
    ids = _ids(CASES[name]["seq_len"])
    runs = []
    original_run = head_parallel._Call.run

    def counted_run(call, task):
        runs.append(len(call.groups))
        return original_run(call, task)

    monkeypatch.setattr(head_parallel, "MIN_GROUP_ELEMENTS", 0)
    monkeypatch.setattr(head_parallel._Call, "run", counted_run)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        unsplit = _loss_and_grads(model, ids)
        assert runs == []
        torch.set_num_threads(2)
        split = _loss_and_grads(model, ids)
    finally:
        torch.set_num_threads(threads)
    if name != "full":  # SDPA is the fused kernel: nothing to split
        assert runs and all(groups == 2 for groups in runs)
    for index, (got, want) in enumerate(zip(split, unsplit)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=f"#{index}")
