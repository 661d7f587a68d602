"""The memory bench (saved-tensor counting) and the planner built on its measurements."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CONF_DIR, compose_config
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from torch import nn

from longctx.bench import memory_plan
from longctx.bench.memory import (
    SavedTensorCounter,
    distinct_layers,
    extrapolate_width,
    measure_block,
    memory_settings,
    narrower,
    run_memory,
)
from longctx.bench.memory_plan import GIB, Options, estimate, longest_context, run_plan
from longctx.errors import ConfigError
from longctx.model import build_block


class FusedProjection(nn.Module):
    """Saves views of one projection (q, k, v) and a bf16 copy of its weight under autocast."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24, bias=False)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return (q * k * v).sum()


def test_counter_counts_each_storage_once_and_leaves_parameters_out():
    module = FusedProjection()
    x = torch.randn(5, 8, requires_grad=True)
    counter = SavedTensorCounter(module)
    with counter.counting():
        module(x)
    # x (saved by the matmul), the projection's output, whose three views q, k, v count once,
    # and the product q * k (saved by the second multiplication).
    assert counter.saved.activations == 5 * 8 * 4 + 5 * 24 * 4 + 5 * 8 * 4
    assert counter.saved.weight_copies == 0  # the fp32 weight is the parameter itself


def test_counter_puts_autocast_weight_copies_apart():
    module = FusedProjection()
    x = torch.randn(5, 8, requires_grad=True)
    counter = SavedTensorCounter(module)
    with torch.autocast("cpu", dtype=torch.bfloat16), counter.counting():
        module(x)
    assert counter.saved.weight_copies == 24 * 8 * 2  # the bf16 copy of the weight
    # The same in bf16: the input's copy, the output, the product.
    assert counter.saved.activations == 5 * 8 * 2 + 5 * 24 * 2 + 5 * 8 * 2


def test_blocks_with_equal_layouts_are_measured_once():
    assert distinct_layers(compose_config("attention=full", "model=tiny")) == {0: 2}
    hybrid = compose_config(
        "attention=hybrid",
        "model=tiny",
        "model.n_layer=5",
        "attention.pattern=[linear,linear,sliding_window]",
        "+attention.backends={sliding_window: {window: 64}}",
    )
    assert distinct_layers(hybrid) == {0: 4, 2: 1}
    longformer = compose_config(
        "attention=longformer", "model=tiny", "model.n_layer=3", "attention.layer_windows=[4,8,4]"
    )
    assert distinct_layers(longformer) == {0: 2, 1: 1}  # windows live in a pattern object


def test_a_representative_block_saves_what_every_block_of_its_layout_saves():
    cfg = compose_config("attention=memory_compressed", "model=tiny", "model.n_layer=4")
    assert distinct_layers(cfg) == {0: 2, 1: 2}  # local and memory-compressed layers alternate
    saved = [measure_block(build_block(cfg, i), 48, 1, "32-true", False) for i in range(4)]
    assert saved[2] == saved[0] != saved[1] == saved[3]


def test_a_checkpointed_block_keeps_its_inputs_only():
    block = build_block(compose_config("attention=full", "model=tiny"), 0)
    plain = measure_block(block, 64, 2, "32-true", False)
    block.checkpointed = True
    kept = measure_block(block, 64, 2, "32-true", False)
    assert kept.activations == 2 * 64 * 64 * 4 and kept.weight_copies == 0
    assert plain.activations > 4 * kept.activations


def test_a_checkpointed_streaming_block_keeps_its_input_and_the_carried_state():
    """As measure_block streams: the state a previous batch left, then the measured batch."""
    options = ["attention.segment_length=16", "attention.mem_len=16"]
    block = build_block(compose_config("attention=transformer_xl", "model=tiny", *options), 0)
    block.checkpointed = True
    kept = measure_block(block, 64, 2, "32-true", True)
    inputs = 2 * 64 * 64 * 4
    memory = 2 * 16 * 64 * 4  # the last mem_len inputs of the previous batch, carried compactly
    assert kept.activations == inputs + memory


def test_memory_mode_measures_fits_and_checks_its_fit(tmp_path):
    settings = {
        "memory": {
            "models": ["tiny"],
            "backends": ["full", "linear"],
            "options": {},
            "lengths": [32, 64],
            "check_length": 128,
            "check_backends": ["full", "linear"],
            "batch": 1,
            "precision": "bf16-mixed",
            "vocab_size": 3000,
            "loss_tokens": 64,
            "plan_lengths": [1024, 2048],
            "gpu_memory_gib": 1,
            "plan_gpus": 2,
        }
    }
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        result = run_memory(settings, tmp_path)
    assert json.loads((tmp_path / "memory.json").read_text())["presets"] == json.loads(
        json.dumps(result["presets"])
    )
    assert [p["backend"] for p in result["presets"]] == ["full", "linear"]
    for preset in result["presets"]:
        assert {row["seq_len"] for row in preset["rows"]} == {32, 64, 128}
        blocks = [r for r in preset["rows"] if r["checkpointing"] == "blocks"]
        assert all(r["bytes_per_token_per_block"] == 64 * 4 for r in blocks)  # the fp32 input
    for check in result["scaling_check"]:  # both backends keep O(N): the fit is exact
        assert abs(check["none"]["relative_error"]) < 1e-9
    loss = result["loss"][0]
    # The plain loss keeps every position's fp32 log-probabilities; the chunked one the inputs.
    assert (
        loss["plain_loss_bytes_per_token"] >= 3000 * 4 > 10 * loss["chunked_loss_bytes_per_token"]
    )
    table = (tmp_path / "memory.md").read_text()
    assert "| tiny | full | [0] | 64 |" in table and "## tiny in 1 GiB per GPU" in table


def test_width_extrapolation_is_exact_for_terms_linear_in_the_width():
    def rows(scale: float) -> list[dict]:
        per_token = 1000 * scale + 24  # widths, plus a norm statistic of no width
        return [
            {
                "seq_len": 64,
                "checkpointing": "none",
                "activation_bytes_per_block": 64 * per_token,
                "bytes_per_token_per_block": per_token,
                "weight_copy_bytes_per_block": 4096 * scale**2 + 64 * scale,
            }
        ]

    (full,) = extrapolate_width({0.125: rows(0.125), 0.25: rows(0.25)})
    assert full == rows(1.0)[0]


def test_a_narrower_model_keeps_its_head_size():
    cfg = compose_config("model=llama_1b")
    narrow = narrower(cfg, 0.125)
    assert (narrow.model.d_model, narrow.model.n_head, narrow.model.mlp_hidden) == (256, 4, 1024)
    assert cfg.model.d_model == 2048  # the composed config is left as it was
    with pytest.raises(ConfigError, match="d_model=2048 times 0.1 is not a whole number"):
        narrower(cfg, 0.1)


def test_bad_memory_settings_are_refused():
    good = {"backends": "all", "lengths": [64, 128], "models": ["tiny"], "precision": "32-true"}
    with pytest.raises(ConfigError, match="two positive lengths"):
        memory_settings({"memory": {**good, "lengths": [64]}})
    with pytest.raises(ConfigError, match="unknown name"):
        memory_settings({"memory": {**good, "backends": ["full", "flash"]}})
    with pytest.raises(ConfigError, match="precision"):
        memory_settings({"memory": {**good, "precision": "fp8"}})


# --- the planner --------------------------------------------------------------------------------

PRESET = {
    "model": "toy",
    "backend": "full",
    "n_layer": 4,
    "parameters": 1_000_000,
    "block_parameters": 200_000,
    "fit": {"none": {"a": 100_000.0, "b": 0.0}, "blocks": {"a": 100.0, "b": 0.0}},
    "rows": [
        {"seq_len": 1024, "checkpointing": "none", "weight_copy_bytes_per_block": 400_000},
        {"seq_len": 1024, "checkpointing": "blocks", "weight_copy_bytes_per_block": 0},
    ],
}


def test_estimate_adds_up_the_documented_terms():
    memory = 10 * GIB
    plain = estimate(PRESET, 50.0, 4096, Options("none", 1, 2), memory)
    assert plain.states == 16_000_000
    assert plain.weight_copies == 4 * 400_000
    assert plain.activations == 4 * 2 * 4096 * 100_000
    assert plain.loss == 2 * 4096 * 50 + memory_plan.CHUNK_BYTES
    assert plain.reserve == GIB
    checkpointed = estimate(PRESET, 50.0, 4096, Options("blocks", 1, 2), memory)
    assert checkpointed.activations == 2 * 4096 * (4 * 100 + 100_000)  # + one block recomputed
    assert checkpointed.weight_copies == 400_000
    every_2 = estimate(PRESET, 50.0, 4096, Options("every_2", 1, 2), memory)
    assert every_2.activations == 2 * 4096 * (2 * 100_000 + 2 * 100 + 100_000)
    sharded = estimate(PRESET, 50.0, 4096, Options("none", 4, 2), memory)
    root = 1_000_000 - 4 * 200_000
    assert sharded.states == 16_000_000 / 4 + (2 * 200_000 + root) * 4


def test_planner_prefers_least_recomputation_then_no_sharding_then_large_batches():
    grid = list(memory_plan.option_grid(4, 8))
    assert grid[:4] == [
        Options("none", 1, 4),
        Options("none", 1, 2),
        Options("none", 1, 1),
        Options("none", 8, 4),
    ]
    assert [o.checkpointing for o in grid] == 6 * ["none"] + 6 * ["every_2"] + 6 * ["blocks"]
    gpu_gib = 3.0
    planned = memory_plan.plan(PRESET, 50.0, 4096, 4, 8, gpu_gib)
    found = memory_plan.first_fit(planned, gpu_gib)
    index = [options for options, _ in planned].index(found)
    assert index > 0 and planned[index][1].total <= gpu_gib * GIB
    assert all(guess.total > gpu_gib * GIB for _, guess in planned[:index])


def test_longest_context_is_where_the_estimate_crosses_the_memory():
    options = Options("none", 1, 1)
    longest = longest_context(PRESET, 50.0, options, 1.0)
    memory = GIB
    assert estimate(PRESET, 50.0, longest, options, memory).total <= memory
    assert estimate(PRESET, 50.0, longest + 1024, options, memory).total > memory
    assert longest_context(PRESET, 50.0, Options("blocks", 1, 1), 1.0) > longest


def test_plan_mode_prints_every_option_and_a_recommendation(tmp_path):
    measured = tmp_path / "memory.json"
    measured.write_text(
        json.dumps(
            {"presets": [PRESET], "loss": [{"model": "toy", "chunked_loss_bytes_per_token": 50}]}
        )
    )
    plan = {
        "measured": str(measured),
        "model": "toy",
        "attention": "full",
        "context_length": 4096,
        "batch_size": 1,
        "gpus": 2,
        "gpu_memory_gib": 3.0,
    }
    lines = run_plan({"plan": plan})
    assert len(lines) == 2 + 3 * 2 + 1
    assert lines[-1] == "use activation_checkpointing=none, no sharding, batch_size=1"
    with pytest.raises(ConfigError, match="no measurement of model=toy attention=rwkv"):
        run_plan({"plan": {**plan, "attention": "rwkv"}})
    with pytest.raises(ConfigError, match="is not a file"):
        run_plan({"plan": {**plan, "measured": str(tmp_path / "none.json")}})
