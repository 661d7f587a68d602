"""FSDP for every backend: two CPU processes (gloo) train like one process with the same batch.

torch's FSDP1 (behind Lightning's FSDPStrategy, trainer=fsdp) refuses CPUs, so these tests use
FSDP2 (`fully_shard`, trainer=fsdp2) with the same units as trainer=fsdp's wrap policy. The fast
tests shard the model with the preset's own function (longctx.train.sharding) and run the
preset's training-step code (LanguageModelTask.training_loss) in two spawned processes; the slow
one runs train.py with trainer=fsdp2 for real. Ordered-stream backends (transformer_xl and
hybrids containing it) are the case that used to fail: their training went through a method
beside the blocks' forward, which FSDP's hooks never see.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import ROOT, compose_config
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from longctx.jobs import train
from longctx.model import Block
from longctx.train.module import LanguageModelTask
from longctx.train.sharding import fully_shard_model

VOCAB = 50
PER_RANK_BATCH = 2
LENGTH = 24
STEPS = 3
CHECKPOINTING = ("none", "blocks")

# Small settings: segments of 8 so that every step spans several segments and a partial one.
BACKENDS = {
    "full": {"name": "full"},
    "transformer_xl": {"name": "transformer_xl", "segment_length": 8, "mem_len": 8},
    "hybrid_transformer_xl": {
        "name": "hybrid",
        "pattern": ["transformer_xl", "sliding_window"],
        "backends": {
            "transformer_xl": {"segment_length": 8, "mem_len": 8},
            "sliding_window": {"window": 5},
        },
    },
}


def backend_config(attention: dict):
    cfg = compose_config("model=tiny", f"context_length={LENGTH}")
    with open_dict(cfg):
        cfg.attention = attention
    HydraConfig.instance().set_config(cfg)  # the task resolves the run name it records
    return cfg


def make_batches(ordered: bool) -> list[dict]:
    """STEPS global batches of 2 x PER_RANK_BATCH rows; ordered ones restart some rows."""
    generator = torch.Generator().manual_seed(3)
    rows = 2 * PER_RANK_BATCH
    batches = []
    for step in range(STEPS):
        ids = torch.randint(0, VOCAB, (rows, LENGTH + 1), generator=generator)
        batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}
        if ordered:
            batch["reset"] = (
                torch.ones(rows, dtype=torch.bool)
                if step == 0
                else torch.tensor([step % 2 == 0, False, True, False])
            )
        batches.append(batch)
    return batches


def rows_of(batch: dict, rank: int) -> dict:
    share = slice(rank * PER_RANK_BATCH, (rank + 1) * PER_RANK_BATCH)
    return {key: value[share] for key, value in batch.items()}


def train_steps(task: LanguageModelTask, batches: list[dict]) -> list[torch.Tensor]:
    """The preset's training step (task.training_loss), backward, an optimizer step; the losses.

    Plain SGD: its update is linear in the gradient, so the comparison sees the gradients
    themselves rather than Adam's normalisation, which turns the rounding of near-zero gradients
    into updates of full size.
    """
    optimizer = torch.optim.SGD(task.model.parameters(), lr=0.5)
    losses = []
    for batch in batches:
        loss = task.training_loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return losses


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: (value.full_tensor() if isinstance(value, DTensor) else value).detach().clone()
        for name, value in model.state_dict().items()
    }


def initial_task(backend: str) -> LanguageModelTask:
    torch.manual_seed(0)
    return LanguageModelTask(backend_config(BACKENDS[backend]), VOCAB)


def sharded_worker(rank: int, port: int, setups: dict, out: str) -> None:
    """One rank: for each backend and checkpointing setting, the same initial weights sharded
    over both ranks, trained on this rank's rows of every batch. Rank 0 saves the mean losses and
    the gathered weights."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        results = {}
        for (backend, checkpointing), (cfg_yaml, weights, batches) in setups.items():
            task = LanguageModelTask(OmegaConf.create(cfg_yaml), VOCAB)
            task.model.load_state_dict(weights)
            task.model.activation_checkpointing = checkpointing
            fully_shard_model(task.model, init_device_mesh("cpu", (2,)))
            losses = torch.stack(train_steps(task, [rows_of(batch, rank) for batch in batches]))
            # Each rank's loss is the mean over its rows: their mean is the global batch's.
            dist.all_reduce(losses)
            results[backend, checkpointing] = {
                "losses": losses / 2,
                "weights": full_weights(task.model),
            }
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory) -> dict:
    """Every backend's two-rank run, in one pair of processes (starting them is the slow part)."""
    setups = {}
    for backend in BACKENDS:
        task = initial_task(backend)
        batches = make_batches(task.ordered_stream)
        for checkpointing in CHECKPOINTING:
            setups[backend, checkpointing] = (
                OmegaConf.to_yaml(task.cfg),
                full_weights(task.model),
                batches,
            )
    out = tmp_path_factory.mktemp("fsdp") / "sharded.pt"
    mp.spawn(sharded_worker, args=(free_port(), setups, str(out)), nprocs=2)
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("checkpointing", CHECKPOINTING)
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_fsdp_two_ranks_match_one_process(backend, checkpointing, sharded_runs):
    """The sharded runs with and without activation checkpointing against one process without."""
    single = initial_task(backend)
    initial = full_weights(single.model)
    single_losses = torch.stack(train_steps(single, make_batches(single.ordered_stream)))
    sharded = sharded_runs[backend, checkpointing]
    # Gloo's reduce-scatter sums the two ranks' gradients in another order than one process
    # does: fp32 rounding only.
    torch.testing.assert_close(sharded["losses"], single_losses, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sharded["weights"], full_weights(single.model), rtol=1e-5, atol=1e-6)
    moved = max((w - initial[k]).abs().max() for k, w in sharded["weights"].items())
    assert moved > 1e-2  # the comparison is between trained weights, not the initial ones


def test_fsdp_units_are_the_blocks_of_the_fsdp1_wrap_policy():
    """trainer=fsdp2 shards the units that trainer=fsdp's ModuleWrapPolicy names."""
    policy = instantiate(compose_config("trainer=fsdp").trainer.strategy.auto_wrap_policy)
    assert policy._module_classes == {Block}
    assert (
        compose_config("trainer=fsdp2").trainer.strategy._target_
        == "longctx.train.sharding.FullyShardedStrategy"
    )


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_fsdp_sees_every_block_run_in_the_training_step(backend):
    """FSDP1 (trainer=fsdp, GPU only) gathers a unit's parameters in that unit's forward hooks:
    the training step must call every Block (and the model) through its forward."""
    task = initial_task(backend)
    called = []
    for module in [task.model, *task.model.blocks]:
        module.register_forward_pre_hook(lambda module, args: called.append(module))
    for batch in make_batches(task.ordered_stream)[:2]:
        task.training_loss(rows_of(batch, 0)).backward()
    assert called == 2 * [task.model, *task.model.blocks]


@pytest.mark.slow
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_fsdp_preset_in_train_py_matches_one_process(backend, tmp_path):
    """train.py trainer=fsdp2 on two CPU processes against trainer=cpu with both ranks' rows."""
    attention = OmegaConf.to_container(OmegaConf.create(BACKENDS[backend]))
    common = [
        "model=tiny",
        "context_length=32",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "trainer.limit_val_batches=2",
        "trainer.precision=32-true",
        "trainer.log_every_n_steps=1",
        "logger=csv",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"++attention={attention}".replace("'", ""),
    ]
    sharded_run, single_run = tmp_path / "fsdp", tmp_path / "single"
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            *common,
            "trainer=fsdp2",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            f"batch_size={PER_RANK_BATCH}",
            f"hydra.run.dir={sharded_run}",
            "eval_after_fit=true",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "WANDB_MODE": "offline"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    # Evaluation is left to its own one-GPU job, whose command the log gives.
    assert (
        "eval_after_fit skipped" in result.stderr and "python eval.py ckpt_path=" in result.stderr
    )
    assert not (sharded_run / "results.json").exists()
    cfg = compose_config(
        *common,
        "eval_after_fit=false",
        "trainer=cpu",
        f"batch_size={2 * PER_RANK_BATCH}",
        f"paths.root_dir={ROOT}",
        f"paths.output_dir={single_run}",
    )
    HydraConfig.instance().set_config(cfg)
    train(cfg)
    checkpoints = [
        torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        for run in (sharded_run, single_run)
    ]
    assert checkpoints[0]["global_step"] == checkpoints[1]["global_step"] == 3
    torch.testing.assert_close(
        checkpoints[0]["state_dict"], checkpoints[1]["state_dict"], rtol=1e-5, atol=1e-5
    )
