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
import shutil
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
from longctx.errors import ConfigError
from longctx.jobs import train
from longctx.train.run import resolve_ckpt_path
from longctx.train.schedule import warmup_cosine

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


# --- a resumed run is the run it continues ---------------------------------------------------

BASE_RUN = [
    "attention=sliding_window",
    "attention.window=16",
    "model=tiny",
    "context_length=32",
    "batch_size=4",
    "optim.warmup_steps=1",
]
# What a resume passes besides the run directory: the CPU trainer and a short horizon.
RESUME = ["trainer=debug", "logger=csv", "eval_after_fit=false", "ckpt_path=last"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_cache) -> Path:
    """A sliding-window tiny run trained to its trainer.max_steps=4, a checkpoint every 2 steps."""
    out = tmp_path_factory.mktemp("base") / "run"
    overrides = [*BASE_RUN, "trainer=debug", "logger=csv", "eval_after_fit=false"]
    train_in_process(
        out, [*overrides, "checkpoint_every_n_steps=2", f"data.cache_dir={data_cache}"]
    )
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def resume(out: Path, cache: Path, *overrides: str) -> dict:
    """train.py's resume of `out` (ckpt_path=last) with only the overrides given."""
    cfg = compose_config(
        *RESUME,
        *overrides,
        f"paths.root_dir={ROOT}",
        f"paths.output_dir={out}",
        f"data.cache_dir={cache}",
    )
    HydraConfig.instance().set_config(cfg)
    return train(cfg)


def test_the_readme_command_resumes_the_run_it_names(run_copy, data_cache, caplog):
    """No model, attention or context override: they are restored from the checkpoint."""
    resume(run_copy, data_cache, "trainer.max_steps=6")
    saved = load(run_copy / "checkpoints" / "last.ckpt")
    cfg = saved["hyper_parameters"]["cfg"]
    assert saved["global_step"] == 6
    assert cfg["attention"]["name"] == "sliding_window" and cfg["attention"]["window"] == 16
    assert cfg["model"]["n_layer"] == 2 and cfg["model"]["d_model"] == 64
    assert cfg["context_length"] == 32 and cfg["batch_size"] == 4
    assert "restored from the checkpoint: " in caplog.text and "model.d_model=64" in caplog.text


@pytest.mark.parametrize(
    "override,named",
    [
        ("attention=full", r"attention.name is 'sliding_window' in the checkpoint but 'full' here"),
        (
            "attention=sliding_window attention.window=8",
            r"attention.window is 16 in the checkpoint but 8 here",
        ),
        ("model=mini", r"model.d_model is 64 in the checkpoint but 256 here"),
        ("model.n_layer=3", r"model.n_layer is 2 in the checkpoint but 3 here"),
        ("context_length=64", r"context_length is 32 in the checkpoint but 64 here"),
        ("tokenizer=bpe", r"tokenizer.name is 'byte' in the checkpoint but 'bpe' here"),
        ("data=synthetic", r"data.name is 'bundled' in the checkpoint but 'synthetic' here"),
    ],
)
def test_a_conflicting_override_is_refused_naming_the_setting(override, named, run_copy, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in run_copy.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match=rf"continues another run: .*{named}"):
        resume(run_copy, tmp_path / "fresh_cache", *override.split(), "trainer.max_steps=6")
    assert not (tmp_path / "fresh_cache").exists(), "refused after data work"
    assert before == {p: p.stat().st_mtime_ns for p in run_copy.rglob("*") if p.is_file()}


def logged_learning_rates(out: Path) -> dict[int, float]:
    with open(out / "csv" / "metrics.csv") as handle:
        return {
            int(row["step"]): float(row["train/lr"])
            for row in csv.DictReader(handle)
            if row.get("train/lr")
        }


def test_a_new_lr_and_a_longer_horizon_apply_on_resume(run_copy, data_cache, caplog):
    before = logged_learning_rates(run_copy)
    resume(run_copy, data_cache, "trainer.max_steps=10", "optim.lr=1e-3")
    rates = logged_learning_rates(run_copy)
    schedule = warmup_cosine(warmup_steps=1, total_steps=10, min_ratio=0.1)
    assert {step: rates[step] for step in before} == before  # the first 4 steps' history
    for step in range(4, 10):
        assert rates[step] == pytest.approx(1e-3 * schedule(step), rel=1e-6), step
    # Rebuilt for the new horizon, not replayed: the old cosine ended at step 4 and would
    # climb back to its peak over steps 5-7.
    assert all(rates[s + 1] <= rates[s] for s in range(4, 9))
    saved = load(run_copy / "checkpoints" / "last.ckpt")
    assert saved["optimizer_states"][0]["param_groups"][0]["initial_lr"] == 1e-3
    assert saved["hyper_parameters"]["cfg"]["optim"]["lr"] == 1e-3
    assert "optim.lr: 0.003 -> 0.001" in caplog.text and "trainer.max_steps: 4 -> 10" in caplog.text


def test_the_csv_history_is_kept_across_a_resume(run_copy, data_cache):
    metrics = run_copy / "csv" / "metrics.csv"
    rows_before = metrics.read_text().splitlines()[1:]
    resume(run_copy, data_cache, "trainer.max_steps=6")
    rows_after = metrics.read_text().splitlines()[1:]
    assert len(rows_after) > len(rows_before)
    losses = logged_losses(run_copy)
    assert sorted(losses) == list(range(6)), "one training loss per step, none lost or doubled"
    with open(metrics) as handle:
        steps = [int(r["step"]) for r in csv.DictReader(handle) if r.get("train/loss")]
    assert steps == sorted(steps) and len(steps) == len(set(steps))


def test_rows_logged_after_the_checkpoint_are_replaced_not_doubled(run_copy, data_cache):
    """A run killed after its checkpoint at step 4 logged step 4 already; the resume redoes it."""
    metrics = run_copy / "csv" / "metrics.csv"
    with open(metrics, "a") as handle:
        handle.write(metrics.read_text().splitlines()[-1].replace(",3,", ",4,", 1) + "\r\n")
    resume(run_copy, data_cache, "trainer.max_steps=6")
    assert sorted(logged_losses(run_copy)) == list(range(6))


def test_a_requeued_finished_run_leaves_its_outputs_untouched(run_copy, data_cache, caplog):
    (run_copy / "results.json").write_text('{"evaluated": true}')
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run_copy.rglob("*") if p.is_file()}
    assert resume(run_copy, data_cache, "eval_after_fit=true", "trainer.max_steps=4") == {}
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run_copy.rglob("*") if p.is_file()}
    assert after == before
    assert "is at step 4 and trainer.max_steps=4: the run is finished" in caplog.text


def test_stale_partial_files_are_removed_on_resume(run_copy, data_cache):
    stale = run_copy / "checkpoints" / ".last.ckpt.k1ll3d.partial"
    stale.write_bytes(b"PK\x03\x04 half a checkpoint")
    resume(run_copy, data_cache, "trainer.max_steps=5")
    assert not stale.exists()


def test_the_last_checkpoint_holds_the_final_step(run_copy, data_cache):
    """max_steps=5 is no multiple of the interval 2: the final step is saved anyway."""
    resume(run_copy, data_cache, "trainer.max_steps=5", "checkpoint_every_n_steps=2")
    assert load(run_copy / "checkpoints" / "last.ckpt")["global_step"] == 5
    assert sorted(p.name for p in (run_copy / "checkpoints").glob("last*")) == ["last.ckpt"]


@pytest.mark.skipif(
    "transformer_xl" not in available_backends(), reason="needs the transformer_xl backend"
)
@pytest.mark.parametrize("stream_state", ["empty", "absent"])
def test_memory_restarting_empty_is_said(stream_state, tmp_path, data_cache, caplog):
    out = tmp_path / "run"
    overrides = [*run_overrides(data_cache, "ordered"), "trainer.max_steps=2", "model.dropout=0"]
    train_in_process(out, [*overrides, "checkpoint_every_n_steps=2"])
    last = out / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["callbacks"]["StreamStateCheckpoint"]["by_rank"], "saved at its step"
    # As a checkpoint written mid-step (SLURM's signal) or by an older version carries it.
    if stream_state == "empty":
        checkpoint["callbacks"]["StreamStateCheckpoint"]["by_rank"] = []
    else:
        del checkpoint["callbacks"]["StreamStateCheckpoint"]
    torch.save(checkpoint, last)
    train_in_process(out, [*overrides, "trainer.max_steps=3", "ckpt_path=last"])
    assert "the checkpoint holds no stream state" in caplog.text
    assert "memory restarts empty" in caplog.text
