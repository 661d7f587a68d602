"""Bad input: config errors before any data work, unusable files, a NaN loss,
a full disk while checkpointing."""

from __future__ import annotations

import dataclasses
import errno
import os
import resource
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose_config
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from omegaconf import open_dict

import longctx.attention.registry as registry
from longctx.attention import Backend, available_backends, backend_class, register
from longctx.attention.full import FullAttention
from longctx.errors import ConfigError
from longctx.jobs import train
from longctx.train.callbacks import NonFiniteLossError
from longctx.train.checkpoint_io import AtomicCheckpointIO
from longctx.train.module import LanguageModelTask

SMALL_RUN = [
    "model=tiny",
    "trainer=debug",
    "context_length=32",
    "batch_size=4",
    "logger=csv",
    "eval_after_fit=false",
]


def configure(tmp_path: Path, *overrides: str):
    cfg = compose_config(
        *SMALL_RUN,
        f"paths.root_dir={ROOT}",
        f"paths.output_dir={tmp_path / 'run'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        *overrides,
    )
    HydraConfig.instance().set_config(cfg)
    return cfg


# --- config errors come before any data preparation ---------------------------------------


class BlockedForTests(Backend):
    """Full attention that, like block-sparse patterns,
    needs the context to be a whole number of blocks."""

    name = "blocked_for_tests"

    @dataclass(frozen=True)
    class Options:
        block: int = 16

    def validate(self) -> None:
        if self.dims.context_length % self.options.block:
            raise ConfigError(
                f"attention={self.name} needs context_length to be a multiple of attention.block="
                f"{self.options.block}, got {self.dims.context_length}"
            )

    def mixer(self, layer: int):
        return FullAttention(FullAttention.Options(), self.dims).mixer(layer)


@pytest.fixture
def blocked_backend():
    """Registered only for the test that uses it:
    the shared backend table lists every registered backend."""
    register(BlockedForTests)
    yield BlockedForTests.name
    registry._BACKENDS.pop(BlockedForTests.name)


def registered(names, why: str) -> list:
    found = [name for name in names if name in available_backends()]
    return found or [
        pytest.param(None, marks=pytest.mark.skip(reason=f"no registered backend {why}"))
    ]


def backends_with_option(option: str) -> list:
    return registered(
        [
            n
            for n in available_backends()
            if option in {f.name for f in dataclasses.fields(backend_class(n).Options)}
        ],
        f"has a `{option}` option",
    )


# Sparse patterns whose window, block or stride must fit in the context: a longer one is full
# attention under another name.
BLOCKED_PATTERNS = {
    "local": "block_size",
    "blockwise": "block_size",
    "sparse_strided": "stride",
    "sparse_fixed": "stride",
    "sliding_window": "window",
    "dilated": "window",
    "longformer": "window",
}


def assert_config_error_before_data(tmp_path: Path, overrides: list[str], match: str) -> None:
    """The data points at files that do not exist: only a config check can raise first."""
    cfg = configure(
        tmp_path, "data=local", f"data.data_files={tmp_path / 'missing' / '*.txt'}", *overrides
    )
    with pytest.raises(ConfigError, match=match):
        train(cfg)
    assert not (tmp_path / "cache").exists()


CONFIG_ERRORS = {
    "unknown backend lists the valid ones": (
        ["attention.name=no_such_backend"],
        r"unknown attention backend 'no_such_backend'; valid choices: .*full",
    ),
    "unknown option lists the valid ones": (["+attention.windw=8"], r"no option\(s\) \['windw'\]"),
    "heads do not divide the width": (
        ["model.n_head=3"],
        r"model.d_model=64 must be divisible by model.n_head=3",
    ),
    "unknown sampling": (["sampling=shuffled"], r"sampling='shuffled' is not valid"),
    "unknown mlp": (["model.mlp=relu3"], r"model.mlp='relu3' is not valid"),
    "checkpoint interval not in steps": (
        ["trainer.val_check_interval=0.5"],
        r"set checkpoint_every_n_steps",
    ),
}


@pytest.mark.parametrize("overrides,match", list(CONFIG_ERRORS.values()), ids=list(CONFIG_ERRORS))
def test_config_errors_come_before_data_and_say_what_to_change(tmp_path, overrides, match):
    assert_config_error_before_data(tmp_path, overrides, match)


def test_context_not_a_whole_number_of_blocks_is_refused(tmp_path, blocked_backend):
    overrides = [f"attention.name={blocked_backend}", "+attention.block=16", "context_length=40"]
    assert_config_error_before_data(tmp_path, overrides, r"multiple of attention.block=16, got 40")


@pytest.mark.skipif(
    "transformer_xl" not in available_backends(), reason="needs the transformer_xl backend"
)
def test_memory_backend_refuses_packed_data(tmp_path):
    assert_config_error_before_data(
        tmp_path,
        ["attention=transformer_xl", "sampling=packed"],
        r"needs ordered\s+streams.*sampling=auto",
    )


@pytest.mark.parametrize("backend", registered(BLOCKED_PATTERNS, f"among {list(BLOCKED_PATTERNS)}"))
def test_window_or_block_longer_than_the_context_is_refused(tmp_path, backend):
    key = BLOCKED_PATTERNS[backend]
    assert_config_error_before_data(
        tmp_path,
        [f"attention={backend}", f"attention.{key}=64", "context_length=32"],
        rf"{key}=64 is longer than context_length=32",
    )


@pytest.mark.skipif("longformer" not in available_backends(), reason="needs the longformer backend")
def test_a_longformer_layer_window_longer_than_the_context_is_refused(tmp_path):
    overrides = [
        "attention=longformer",
        "attention.window=16",
        "attention.layer_windows=[16,64]",
        "context_length=32",
    ]
    assert_config_error_before_data(
        tmp_path, overrides, r"layer_windows=64 is longer than context_length=32"
    )


@pytest.mark.parametrize("backend", backends_with_option("max_len"))
def test_context_beyond_max_len_is_refused(tmp_path, backend):
    assert_config_error_before_data(
        tmp_path,
        [f"attention.name={backend}", "+attention.max_len=16", "context_length=32"],
        "max_len",
    )


def test_bad_trainer_setting_fails_before_data(tmp_path):
    cfg = configure(
        tmp_path,
        "data=local",
        f"data.data_files={tmp_path / 'missing' / '*.txt'}",
        "+trainer.strategy=no_such_strategy",
    )
    with pytest.raises(
        InstantiationException, match="invalid strategy name: `strategy='no_such_strategy'`"
    ):
        train(cfg)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    "path", sorted((ROOT / "conf" / "attention").glob("*.yaml")), ids=lambda p: p.stem
)
@pytest.mark.parametrize("context", ["default", "4096"])
def test_every_shipped_attention_config_passes_validation(path, context):
    """validate_config builds the model on the meta device: every backend must allow that, and
    `python train.py attention=<name>` must work with the default context length."""
    from longctx.train.run import validate_config

    overrides = [] if context == "default" else [f"context_length={context}"]
    validate_config(compose_config(f"attention={path.stem}", "model=tiny", *overrides))


# --- unusable files -------------------------------------------------------------------------


def test_unusable_files_are_skipped_and_counted_and_training_goes_on(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(6):
        (docs / f"book_{i}.txt").write_text(f"Chapter {i}. It was a dark and stormy night. " * 40)
    (docs / "empty.txt").write_text("")
    (docs / "blank.txt").write_text("  \n\n ")
    (docs / "image.txt").write_bytes(bytes(range(256)) * 4)
    (docs / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e".encode("latin-1"))
    cfg = configure(
        tmp_path,
        "data=local",
        f"data.data_files={docs / '*.txt'}",
        "data.num_proc=1",
        "data.split_fractions={train: 0.67, validation: 0.17, test: 0.16}",
        "trainer.max_steps=1",
    )
    with pytest.warns(
        UserWarning, match=r"skipped 4 of 10 files .*1 binary, 2 empty, 1 undecodable"
    ):
        train(cfg)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 1


def test_corpus_without_a_usable_document_fails_clearly(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "empty.txt").write_text("")
    (docs / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    cfg = configure(tmp_path, "data=local", f"data.data_files={docs / '*.txt'}")
    with (
        pytest.warns(UserWarning, match="skipped 2 of 2"),
        pytest.raises(ValueError, match=r"no usable document: 2 files match"),
    ):
        train(cfg)


# --- a NaN loss stops the run and keeps the last good checkpoint ----------------------------


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real_loss = LanguageModelTask.training_loss

    def loss_nan_at_step_3(task, batch):
        loss = real_loss(task, batch)
        return loss * float("nan") if task.global_step == 3 else loss

    monkeypatch.setattr(LanguageModelTask, "training_loss", loss_nan_at_step_3)
    cfg = configure(tmp_path, "trainer.max_steps=6", "checkpoint_every_n_steps=2")
    with pytest.raises(
        NonFiniteLossError,
        match=(
            r"the training loss is nan at step 3 .*last good checkpoint is .*last\.ckpt"
            r".*Lower optim\.lr"
        ),
    ):
        train(cfg)
    checkpoints = tmp_path / "run" / "checkpoints"
    last = load_checkpoint(checkpoints / "last.ckpt")
    assert last["global_step"] == 2
    assert all(torch.isfinite(value).all() for value in last["state_dict"].values())
    assert all(load_checkpoint(path)["global_step"] <= 2 for path in checkpoints.glob("*.ckpt"))


# --- a full disk while checkpointing never corrupts last.ckpt --------------------------------


def test_disk_full_during_checkpointing_keeps_the_previous_last_ckpt(tmp_path, monkeypatch):
    real_save = torch.save
    saves = []

    def save_fails_on_second_checkpoint(obj, handle, *args, **kwargs):
        saves.append(handle)
        if len(saves) < 2:
            return real_save(obj, handle, *args, **kwargs)
        handle.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save_fails_on_second_checkpoint)
    cfg = configure(
        tmp_path, "trainer.max_steps=4", "checkpoint_every_n_steps=2", "trainer.limit_val_batches=0"
    )
    with pytest.raises(OSError, match="No space left"):
        train(cfg)
    monkeypatch.undo()
    checkpoints = tmp_path / "run" / "checkpoints"
    assert load_checkpoint(checkpoints / "last.ckpt")["global_step"] == 2
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt"]


def write_naively(checkpoint: dict, path: Path) -> None:
    """What an in-place writer does: open the target for writing, then fill it."""
    with open(path, "wb") as handle:
        torch.save(checkpoint, handle)


@pytest.mark.skipif(os.name != "posix", reason="RLIMIT_FSIZE is POSIX")
@pytest.mark.parametrize("writer", ["atomic", "naive"])
def test_write_cut_short_by_the_os_leaves_the_old_file_whole_only_when_atomic(tmp_path, writer):
    """A real partial write: the OS refuses bytes past RLIMIT_FSIZE (EFBIG)
    after writing those before it.

    The naive writer is the control: the same failure destroys its old file, so the test can tell.
    """
    target = tmp_path / "last.ckpt"
    old = {"global_step": 2, "weights": torch.arange(1000.0)}
    AtomicCheckpointIO().save_checkpoint(old, target)
    new = {
        "global_step": 4,
        "weights": torch.randn(1 << 18),
    }  # 1 MiB of data: well past the limit below
    write = AtomicCheckpointIO().save_checkpoint if writer == "atomic" else write_naively
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous_handler = signal.signal(
        signal.SIGXFSZ, signal.SIG_IGN
    )  # get EFBIG instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        # torch.save reports the failed write as a RuntimeError from its zip writer,
        # with the OSError as context.
        with pytest.raises((OSError, RuntimeError)) as error:
            write(new, target)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)
    causes = [error.value, error.value.__context__, error.value.__cause__]
    assert any(isinstance(cause, OSError) and cause.errno == errno.EFBIG for cause in causes)
    if writer == "atomic":
        assert load_checkpoint(target)["global_step"] == 2
        assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    else:
        # The zip reader rejects the truncated file: OSError (EINVAL) with current torch,
        # RuntimeError ("failed finding central directory") with older releases.
        with pytest.raises((OSError, RuntimeError)):
            load_checkpoint(target)


def test_checkpoint_io_is_used_by_the_trainer(tmp_path):
    from longctx.train.run import build_trainer

    cfg = configure(tmp_path)
    trainer = build_trainer(cfg, callbacks=[], logger=False)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    with open_dict(cfg):
        cfg.trainer.plugins = [{"_target_": "lightning.pytorch.plugins.io.TorchCheckpointIO"}]
    assert (
        type(build_trainer(cfg, callbacks=[], logger=False).strategy.checkpoint_io).__name__
        == "TorchCheckpointIO"
    )
