"""Exact resume: a CPU run killed with SIGKILL mid-training, resumed with ckpt_path=last,
ends where an uninterrupted run does.

The killed run checkpoints every K steps and is stopped after step K + 1 (its step K + 1 is
lost, as after a preemption); resuming redoes it from last.ckpt at step K. Dropout is on, so
the RNG must be restored too; the packed case needs the position inside the shuffled epoch,
the ordered case (Transformer-XL) the memory carried across batches.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose_config
from hydra.core.hydra_config import HydraConfig

from longctx.attention import available_backends
from longctx.data import build_datamodule
from longctx.jobs import train
from longctx.train.run import resolve_ckpt_path

K = 3  # checkpoint interval; both runs end at step 2K
TOLERANCE = 1e-6  # fp32 on one CPU; in practice the runs agree bit for bit

CASES = {
    "packed": ["attention=full"],
    "ordered": ["attention=transformer_xl", "attention.segment_length=16", "attention.mem_len=16"],
}

# Runs train.py as the CLI does, with one extra callback that parks the process after step
# K + 1 and says so in a marker file, so that the test kills it at a known point.
KILLED_CHILD = textwrap.dedent("""
    import runpy, sys, time
    from pathlib import Path
    from lightning.pytorch.callbacks import Callback
    import longctx.train.run as run

    class ParkAfterStep(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == {park_step}:
                Path({marker!r}).write_text(str(trainer.global_step))
                while True:
                    time.sleep(1)

    build_callbacks = run.build_callbacks
    def with_parking(cfg, output_dir):
        callbacks, last = build_callbacks(cfg, output_dir)
        return callbacks + [ParkAfterStep()], last
    run.build_callbacks = with_parking

    sys.argv = ["train.py", *{args!r}]
    runpy.run_path("train.py", run_name="__main__")
""")


def run_overrides(cache: Path, case: str) -> list[str]:
    return [
        *CASES[case],
        "model=tiny",
        "model.dropout=0.1",
        "trainer=debug",
        f"trainer.max_steps={2 * K}",
        f"checkpoint_every_n_steps={K}",
        "context_length=32",
        "batch_size=4",
        "logger=csv",
        "eval_after_fit=false",
        f"data.cache_dir={cache}",
    ]


def train_in_process(out: Path, overrides: list[str]) -> None:
    cfg = compose_config(*overrides, f"paths.root_dir={ROOT}", f"paths.output_dir={out}")
    HydraConfig.instance().set_config(cfg)
    train(cfg)


def start_killed_run(out: Path, overrides: list[str]) -> tuple[subprocess.Popen, Path]:
    marker = out.parent / f"{out.name}.parked"
    code = KILLED_CHILD.format(
        park_step=K + 1, marker=str(marker), args=[*overrides, f"hydra.run.dir={out}"]
    )
    env = {**os.environ, "WANDB_MODE": "offline"}
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    return child, marker


def kill_when_parked(child: subprocess.Popen, marker: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if child.poll() is not None:
            pytest.fail(f"the run to kill exited early:\n{child.stdout.read().decode()[-3000:]}")
        if time.monotonic() > deadline:
            child.kill()
            pytest.fail("the run to kill never reached its parking step")
        time.sleep(0.2)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    child.stdout.close()


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def logged_losses(out: Path) -> dict[int, float]:
    with open(out / "csv" / "metrics.csv") as handle:
        return {
            int(row["step"]): float(row["train/loss"])
            for row in csv.DictReader(handle)
            if row.get("train/loss")
        }


def assert_tensors_match(a, b, what: str) -> None:
    if isinstance(a, torch.Tensor):
        assert a.shape == b.shape, what
        if a.is_floating_point():
            difference = (a.double() - b.double()).abs().max().item()
            assert difference <= TOLERANCE, f"{what}: max difference {difference:.3g}"
        else:
            assert a.equal(b), what
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for key in a:
            assert_tensors_match(a[key], b[key], f"{what}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tensors_match(x, y, f"{what}[{i}]")
    else:
        assert a == b, what


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory) -> Path:
    """A token cache built once, before two processes could race to build it."""
    cache = tmp_path_factory.mktemp("data_cache")
    cfg = compose_config("model=tiny", f"paths.root_dir={ROOT}", f"data.cache_dir={cache}")
    build_datamodule(cfg, ordered_stream=False).prepare_data()
    return cache


@pytest.mark.parametrize("case", list(CASES))
def test_killed_run_resumes_exactly(case, tmp_path, data_cache):
    if case == "ordered" and "transformer_xl" not in available_backends():
        pytest.skip("needs the transformer_xl backend (an ordered-stream backend)")
    overrides = run_overrides(data_cache, case)
    killed, uninterrupted = tmp_path / "killed", tmp_path / "uninterrupted"
    child, marker = start_killed_run(killed, overrides)
    train_in_process(
        uninterrupted, overrides
    )  # meanwhile: the child spends most of its time importing
    kill_when_parked(child, marker)

    assert load(killed / "checkpoints" / "last.ckpt")["global_step"] == K
    train_in_process(killed, [*overrides, "ckpt_path=last"])

    resumed, reference = (
        load(killed / "checkpoints" / "last.ckpt"),
        load(uninterrupted / "checkpoints" / "last.ckpt"),
    )
    assert resumed["global_step"] == reference["global_step"] == 2 * K
    assert_tensors_match(resumed["state_dict"], reference["state_dict"], "weights")
    assert_tensors_match(resumed["optimizer_states"], reference["optimizer_states"], "optimizer")
    assert resumed["lr_schedulers"] == reference["lr_schedulers"]
    reference_losses, resumed_losses = logged_losses(uninterrupted), logged_losses(killed)
    after_resume = [step for step in reference_losses if step >= K]
    assert len(after_resume) == K and all(step in resumed_losses for step in after_resume)
    for step in after_resume:
        assert abs(resumed_losses[step] - reference_losses[step]) <= TOLERANCE, step


def test_ckpt_path_last_takes_the_newest_of_last_and_slurm_checkpoints(tmp_path, caplog):
    assert resolve_ckpt_path("last", tmp_path) is None  # nothing yet: a fresh start, not an error
    assert "starting from scratch" in caplog.text
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes(b"")
    assert resolve_ckpt_path("last", tmp_path) == str(last)
    hpc = tmp_path / "hpc_ckpt_1.ckpt"
    hpc.write_bytes(b"")
    os.utime(last, (1, 1))  # SLURM's SIGUSR1 checkpoint came after the last step checkpoint
    assert resolve_ckpt_path("last", tmp_path) == str(hpc)
    assert resolve_ckpt_path("/some/file.ckpt", tmp_path) == "/some/file.ckpt"
