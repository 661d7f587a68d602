"""Hybrid stacks: each layer is exactly its part's layer, and the presets build."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config, model_config
from probes import receptive_field

from longctx import build_model
from longctx.errors import ConfigError

PARTS = {
    "sliding_window": {"window": 4},
    "linear": {"chunk_size": 8},
    "local": {"block_size": 5},
    "rwkv": {},
    "full": {},
}


def one_layer(attention: str, options: dict, seed: int = 0):
    cfg = model_config(attention, options, "model.n_layer=1", "context_length=64")
    torch.manual_seed(seed)
    return build_model(cfg, 29).double()


@pytest.mark.parametrize(
    "part,other",
    [
        ("sliding_window", "linear"),
        ("linear", "local"),
        ("local", "sliding_window"),
        ("rwkv", "full"),  # RWKV also replaces the MLP with its channel mixing
        ("full", "rwkv"),
    ],
)
def test_each_layer_type_has_its_parts_receptive_field_and_output(part, other):
    hybrid = one_layer(
        "hybrid", {"pattern": [part, other], "backends": {part: PARTS[part], other: PARTS[other]}}
    )
    pure = one_layer(part, PARTS[part])
    ids = torch.randint(0, 29, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(hybrid(ids), pure(ids))
    assert torch.equal(receptive_field(hybrid.eval(), 40), receptive_field(pure.eval(), 40))


def two_layers(attention: str, options: dict, seed: int = 0):
    cfg = model_config(attention, options, "model.n_layer=2", "context_length=64")
    torch.manual_seed(seed)
    return build_model(cfg, 29).double()


# (layer 0, layer 1, layer 1's options): parts whose layer depends on the layer index.
LATER_PARTS = [
    ("full", "rwkv", {}),  # RWKV-4's decay, bonus and token-shift ramps run over the layers
    (
        "linear",
        "longformer",  # layer_windows: layer 1 uses window 6, not layer 0's 3
        {
            "window": 4,
            "dilation": 2,
            "dilated_heads": 2,
            "global_tokens": 2,
            "layer_windows": [3, 6],
        },
    ),
    ("rwkv", "sparse_strided", {"stride": 4, "layout": "layers"}),  # odd layers use A2 only
]


@pytest.mark.parametrize(
    "first,second,options", LATER_PARTS, ids=[f"{a}-{b}" for a, b, _ in LATER_PARTS]
)
def test_a_later_layer_is_that_layer_of_its_part_alone(first, second, options):
    """Layer 1 of hybrid [first, second] is layer 1 of a pure `second` model: the part gets the
    global layer index and n_layer, so per-layer options and inits are the pure model's. The
    parameters that do not depend on the seed (per-layer inits) must already be equal; with the
    random ones copied across, the block computes bit for bit what the pure model's block does."""
    hybrid = two_layers("hybrid", {"pattern": [first, second], "backends": {second: options}})
    pure, reseeded = two_layers(second, options), two_layers(second, options, seed=1)
    got, want = hybrid.blocks[1], pure.blocks[1]
    assert type(got.mixer) is type(want.mixer) and type(got.ffn) is type(want.ffn)
    mine, theirs, other_seed = (m.state_dict() for m in (got, want, reseeded.blocks[1]))
    assert mine.keys() == theirs.keys()
    seedless = [key for key in theirs if torch.equal(theirs[key], other_seed[key])]
    for key in seedless:
        assert torch.equal(mine[key], theirs[key]), key
    got.load_state_dict(theirs)
    x = torch.randn(2, 40, 64, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(got(x), want(x))


def test_rwkv_channel_mixing_replaces_the_mlp_only_in_rwkv_layers():
    cfg = model_config("hybrid", {"pattern": ["rwkv", "full"], "backends": {}}, "model.n_layer=4")
    model = build_model(cfg, 29)
    rwkv_ffn = type(model.blocks[0].ffn)
    assert rwkv_ffn is type(model.blocks[2].ffn)
    assert type(model.blocks[1].ffn).__name__ == "GeluMLP" and rwkv_ffn.__name__ != "GeluMLP"
    assert type(model.blocks[1].mixer).__name__ == "SoftmaxAttention"


@pytest.mark.parametrize(
    "options,message",
    [
        ({"pattern": []}, "non-empty pattern"),
        ({"pattern": ["hybrid"]}, "cannot contain itself"),
        ({"pattern": ["linear"], "backends": {"full": {}}}, "never uses"),
        ({"pattern": ["nope"]}, "valid choices"),
        ({"pattern": ["sliding_window"], "backends": {"sliding_window": {"window": 0}}}, "window"),
    ],
)
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
