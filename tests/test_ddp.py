"""DDP: two CPU processes (gloo) train exactly like one process with the same global batch."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose_config
from hydra.core.hydra_config import HydraConfig

from longctx.attention import available_backends
from longctx.data import PackedWindows, build_datamodule
from longctx.data.packing import ResumableShardSampler
from longctx.jobs import train

STEPS = 3
PER_RANK_BATCH = 4

# The same optimisation in both runs: fp32, no bf16 autocast, identical schedules and logging.
COMMON = [
    "model=tiny",
    "context_length=32",
    f"trainer.max_steps={STEPS}",
    f"trainer.val_check_interval={STEPS}",
    "trainer.limit_val_batches=2",
    "trainer.precision=32-true",
    "trainer.log_every_n_steps=1",
    "logger=csv",
    "eval_after_fit=false",
]


def logged_losses(out: Path) -> dict[int, float]:
    with open(out / "csv" / "metrics.csv") as handle:
        return {
            int(row["step"]): float(row["train/loss"])
            for row in csv.DictReader(handle)
            if row.get("train/loss")
        }


def test_sampler_shares_of_two_ranks_make_up_the_single_process_batches():
    windows = PackedWindows(torch.arange(32 * 41 + 1).numpy(), 32)
    single = list(ResumableShardSampler(windows, num_replicas=1, rank=0, seed=5))
    shares = [
        list(ResumableShardSampler(windows, num_replicas=2, rank=r, seed=5)) for r in range(2)
    ]
    assert not set(shares[0]) & set(shares[1])
    batches = len(shares[0]) // PER_RANK_BATCH
    assert batches >= 2
    for step in range(batches):
        ddp_step = {
            i
            for share in shares
            for i in share[step * PER_RANK_BATCH : (step + 1) * PER_RANK_BATCH]
        }
        assert ddp_step == set(single[step * 2 * PER_RANK_BATCH : (step + 1) * 2 * PER_RANK_BATCH])


def test_two_cpu_processes_match_one_process_with_the_same_global_batch(tmp_path):
    """If both ranks read the same windows, the global batch would hold 4 windows twice,
    not 8 distinct ones, and neither the losses nor the weights would match the single
    process's. The DDP run also checkpoints its blocks' activations, which changes nothing
    (tests/test_scale.py): it still matches the single process, which does not."""
    cache = tmp_path / "data_cache"
    build_datamodule(
        compose_config("model=tiny", f"paths.root_dir={ROOT}", f"data.cache_dir={cache}"), False
    ).prepare_data()
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    ddp = subprocess.Popen(
        [
            sys.executable,
            "train.py",
            *COMMON,
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "model.activation_checkpointing=blocks",
            f"batch_size={PER_RANK_BATCH}",
            f"data.cache_dir={cache}",
            f"hydra.run.dir={ddp_out}",
        ],
        cwd=ROOT,
        env={**os.environ, "WANDB_MODE": "offline"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        # Meanwhile, in this process: one rank with both ranks' rows in each batch.
        cfg = compose_config(
            *COMMON,
            "trainer=cpu",
            f"batch_size={2 * PER_RANK_BATCH}",
            f"data.cache_dir={cache}",
            f"paths.root_dir={ROOT}",
            f"paths.output_dir={single_out}",
        )
        HydraConfig.instance().set_config(cfg)
        train(cfg)
        output, _ = ddp.communicate(timeout=300)
    finally:
        if ddp.poll() is None:
            ddp.kill()
            ddp.wait()
    assert ddp.returncode == 0, output.decode()[-4000:]

    ddp_ckpt = torch.load(
        ddp_out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    single_ckpt = torch.load(
        single_out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    assert ddp_ckpt["global_step"] == single_ckpt["global_step"] == STEPS
    # Gloo sums the two ranks' gradients in another order than one process does: fp32 rounding,
    # which Adam's normalisation enlarges on near-zero gradients
    # (measured: up to 1.5e-6 after 3 steps).
    torch.testing.assert_close(
        ddp_ckpt["state_dict"], single_ckpt["state_dict"], rtol=1e-5, atol=1e-5
    )
    ddp_losses, single_losses = logged_losses(ddp_out), logged_losses(single_out)
    assert sorted(ddp_losses) == sorted(single_losses) and len(single_losses) == STEPS
    for step, loss in single_losses.items():
        assert abs(ddp_losses[step] - loss) <= 1e-5, (step, ddp_losses[step], loss)


@pytest.mark.slow
@pytest.mark.skipif(
    "transformer_xl" not in available_backends(), reason="needs the transformer_xl backend"
)
def test_ordered_stream_memory_of_each_rank_is_checkpointed_and_restored(tmp_path):
    """Ranks own different rows, so the checkpoint must hold one memory per rank,
    and a resumed DDP run reads them."""
    run = tmp_path / "run"
    args = [
        sys.executable,
        "train.py",
        *COMMON,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "attention=transformer_xl",
        "attention.segment_length=16",
        "attention.mem_len=16",
        "trainer.max_steps=2",
        "checkpoint_every_n_steps=2",
        f"batch_size={PER_RANK_BATCH}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={run}",
    ]
    first = subprocess.run(
        args, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "offline"}
    )
    assert first.returncode == 0, first.stderr[-4000:]
    checkpoint = torch.load(
        run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    by_rank = checkpoint["callbacks"]["StreamStateCheckpoint"]["by_rank"]
    assert len(by_rank) == 2
    memories = [state["layers"][0][0]["memory"] for state in by_rank]
    assert memories[0].shape == memories[1].shape and memories[0].shape[1] > 0
    assert not torch.equal(memories[0], memories[1])
    resumed = subprocess.run(
        [*args, "trainer.max_steps=4", "ckpt_path=last"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "WANDB_MODE": "offline"},
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "memory restarts empty" not in resumed.stdout + resumed.stderr
    assert (
        torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)[
            "global_step"
        ]
        == 4
    )
