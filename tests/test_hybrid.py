"""Hybrid stacks: each layer is exactly its part's layer, and the presets build."""
from __future__ import annotations

import pytest
import torch

from conftest import compose_config, model_config
from longctx import build_model
from longctx.errors import ConfigError

PARTS = {"sliding_window": {"window": 4}, "linear": {"chunk_size": 8}, "local": {"block_size": 5}}


def one_layer(attention: str, options: dict, seed: int = 0):
    cfg = model_config(attention, options, "model.n_layer=1", "context_length=64")
    torch.manual_seed(seed)
    return build_model(cfg, 29).double()


def receptive_field(model, n: int = 40) -> torch.Tensor:
    """[n, n] bool: does input j change output i (gradient test on the embeddings)?"""
    captured = {}
    model.embed.register_forward_hook(lambda m, i, out: captured.update(x=out) or out.retain_grad())
    ids = torch.randint(0, 29, (1, n), generator=torch.Generator().manual_seed(3))
    field = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        model.zero_grad()
        model(ids)[0, i].sum().backward()
        field[i] = captured["x"].grad[0].abs().sum(-1) > 0
    return field


@pytest.mark.parametrize("part,other", [("sliding_window", "linear"), ("linear", "local"), ("local", "sliding_window")])
def test_each_layer_type_has_its_parts_receptive_field_and_output(part, other):
    hybrid = one_layer("hybrid", {"pattern": [part, other], "backends": {part: PARTS[part], other: PARTS[other]}})
    pure = one_layer(part, PARTS[part])
    ids = torch.randint(0, 29, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(hybrid(ids), pure(ids))
    assert torch.equal(receptive_field(hybrid), receptive_field(pure))


def test_rwkv_channel_mixing_replaces_the_mlp_only_in_rwkv_layers():
    cfg = model_config("hybrid", {"pattern": ["rwkv", "full"], "backends": {}}, "model.n_layer=4")
    model = build_model(cfg, 29)
    rwkv_ffn = type(model.blocks[0].ffn)
    assert rwkv_ffn is type(model.blocks[2].ffn)
    assert type(model.blocks[1].ffn).__name__ == "GeluMLP" and rwkv_ffn.__name__ != "GeluMLP"
    assert type(model.blocks[1].mixer).__name__ == "SoftmaxAttention"


@pytest.mark.parametrize("options,message", [
    ({"pattern": []}, "non-empty pattern"),
    ({"pattern": ["hybrid"]}, "cannot contain itself"),
    ({"pattern": ["linear"], "backends": {"full": {}}}, "never uses"),
    ({"pattern": ["nope"]}, "valid choices"),
    ({"pattern": ["sliding_window"], "backends": {"sliding_window": {"window": 0}}}, "window"),
])
def test_bad_hybrids_fail_at_build_time(options, message):
    with pytest.raises(ConfigError, match=message):
        build_model(model_config("hybrid", options), 29)


@pytest.mark.parametrize("preset", ["hybrid_linear_window", "hybrid_rwkv_full"])
def test_presets_build_and_stream(preset):
    cfg = compose_config(f"attention={preset}", "model=tiny", "model.n_layer=4")
    model = build_model(cfg, 29).double().eval()
    ids = torch.randint(0, 29, (1, 50), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = model(ids)
        state = model.init_state(1)
        first, state = model.step(ids[:, :17], state)
        second, _ = model.step(ids[:, 17:], state)
    torch.testing.assert_close(torch.cat([first, second], 1), reference, rtol=1e-9, atol=1e-9)
