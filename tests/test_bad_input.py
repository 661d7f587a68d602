"""Bad input: config errors before any data work, unusable files, a NaN loss,
a full disk while checkpointing."""

from __future__ import annotations

import copy
import dataclasses
import errno
import os
import re
import resource
import signal
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, SMALL_RUN, compose_config
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import InstantiationException
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

import longctx.attention.registry as registry
from longctx.attention import Backend, available_backends, backend_class, register
from longctx.attention.full import FullAttention
from longctx.errors import ConfigError
from longctx.jobs import train
from longctx.train.callbacks import NonFiniteLossError, NonFiniteStepError
from longctx.train.checkpoint_io import AtomicCheckpointIO
from longctx.train.module import LanguageModelTask


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


# --- every numeric setting: zero, negative, NaN -> a clear error before data work ----------

# (overrides, the key the message must name). One row per bad value a user could type.
BAD_NUMBERS = [
    *[([f"context_length={v}"], "context_length") for v in (0, -32, "nan")],
    *[([f"batch_size={v}"], "batch_size") for v in (0, -4, "nan")],
    (["num_workers=-1"], "num_workers"),
    (["seed=-1"], "seed"),
    (["seed=nan"], "seed"),
    *[([f"checkpoint_every_n_steps={v}"], "checkpoint_every_n_steps") for v in (0, -2, "nan")],
    *[([f"optim.lr={v}"], "optim.lr") for v in (0, -1e-3, "nan", "inf")],
    *[([f"optim.min_lr_ratio={v}"], "optim.min_lr_ratio") for v in (-0.1, 1.5, "nan")],
    *[([f"optim.weight_decay={v}"], "optim.weight_decay") for v in (-0.1, "nan")],
    *[([f"optim.betas={v}"], "optim.betas") for v in ("[0.9,1.0]", "[nan,0.95]", "[0.9]")],
    *[([f"optim.warmup_steps={v}"], "optim.warmup_steps") for v in (-1, "nan")],
    *[([f"trainer.max_steps={v}"], "trainer.max_steps") for v in (0, -1, "nan")],
    *[([f"trainer.val_check_interval={v}"], "trainer.val_check_interval") for v in (0, -1, "nan")],
    *[([f"trainer.limit_val_batches={v}"], "trainer.limit_val_batches") for v in (-1, "nan", 1.5)],
    *[
        ([f"+trainer.limit_train_batches={v}"], "trainer.limit_train_batches")
        for v in (0, -1, "nan")
    ],
    *[
        ([f"trainer.accumulate_grad_batches={v}"], "trainer.accumulate_grad_batches")
        for v in (0, -1, "nan")
    ],
    *[([f"trainer.gradient_clip_val={v}"], "trainer.gradient_clip_val") for v in (-1.0, "nan")],
    *[([f"trainer.log_every_n_steps={v}"], "trainer.log_every_n_steps") for v in (0, -1)],
    (["trainer.num_sanity_val_steps=-2"], "trainer.num_sanity_val_steps"),
    (["trainer.devices=0"], "trainer.devices"),
    (["+trainer.num_nodes=0"], "trainer.num_nodes"),
    *[([f"model.n_layer={v}"], "model.n_layer") for v in (0, -1, "nan")],
    *[([f"model.n_head={v}"], "model.n_head") for v in (0, -4, "nan")],
    *[([f"model.d_model={v}"], "model.d_model") for v in (0, -64, "nan")],
    *[([f"model.mlp_hidden={v}"], "model.mlp_hidden") for v in (0, -1)],
    *[([f"model.rope_base={v}"], "model.rope_base") for v in (0, -1.0, "nan")],
    *[([f"model.dropout={v}"], "model.dropout") for v in (-0.1, 1.0, "nan")],
    (["data.split_fractions={train:0.5,validation:0.1,test:0.1}"], "data.split_fractions"),
    (["data.split_fractions={train:1.2,validation:-0.1,test:-0.1}"], "data.split_fractions"),
    (["data.split_fractions={train:nan,validation:0.5,test:0.5}"], "data.split_fractions"),
    (["data.split_seed=-1"], "data.split_seed"),
    (["data.num_proc=0"], "data.num_proc"),
    *[([f"data.max_eval_windows={v}"], "data.max_eval_windows") for v in (0, -1)],
    *[(["data=synthetic", f"data.num_docs={v}"], "data.num_docs") for v in (0, -5)],
    (["data=synthetic", "data.distances=[0,64]"], "data.distances"),
    (["data=synthetic", "data.distractor_rate=nan"], "data.distractor_rate"),
    (["tokenizer=bpe", "tokenizer.vocab_size=0"], "tokenizer.vocab_size"),
    (["tokenizer=bpe", "tokenizer.max_train_bytes=-1"], "tokenizer.max_train_bytes"),
    (["attention=sliding_window", "attention.window=nan"], "attention.window"),
    (["attention=sliding_window", "attention.window=0"], "window >= 1"),  # the backend's words
    (["attention=linear", "attention.chunk_size=nan"], "attention.chunk_size"),
    *[
        (["eval_after_fit=true", f"eval.context_lengths={v}"], "eval.context_lengths")
        for v in ("[0,32]", "[-16]", "[nan]")
    ],
    *[(["eval_after_fit=true", f"eval.max_tokens={v}"], "eval.max_tokens") for v in (0, "nan")],
    *[(["eval_after_fit=true", f"eval.batch_size={v}"], "eval.batch_size") for v in (0, -1)],
    (["eval_after_fit=true", "+eval.strides=[0]"], "eval.strides"),
    (["eval_after_fit=true", "+eval.passkey={trials:0}"], "eval.passkey"),
    (["eval_after_fit=true", "+eval.prefix_ablation={samples:0}"], "eval.prefix_ablation"),
    (["eval_after_fit=true", "+eval.streaming={max_tokens:0}"], "eval.streaming.max_tokens"),
]


CONFIG_GROUPS = {"attention", "model", "data", "tokenizer", "trainer", "logger"}
_COMPOSED: dict[tuple[str, ...], DictConfig] = {}


def configure_quickly(tmp_path: Path, overrides: list[str]) -> DictConfig:
    """configure(), with Hydra composing once per choice of groups: the values are parsed by
    Hydra's own override parser and set on a copy, so the table stays fast."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    groups = tuple(o for o, p in zip(overrides, parsed) if p.key_or_group in CONFIG_GROUPS)
    if groups not in _COMPOSED:
        _COMPOSED[groups] = configure(tmp_path, *groups)
    cfg = copy.deepcopy(_COMPOSED[groups])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.data.cache_dir = str(tmp_path / "cache")
        for override in parsed:
            if override.key_or_group not in CONFIG_GROUPS:
                OmegaConf.update(cfg, override.key_or_group, override.value(), force_add=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.mark.parametrize("overrides,key", BAD_NUMBERS, ids=[" ".join(o) for o, _ in BAD_NUMBERS])
def test_every_bad_number_is_a_clear_error_before_data(tmp_path, overrides, key):
    cfg = configure_quickly(tmp_path, overrides)
    with pytest.raises(ConfigError, match=re.escape(key)) as error:
        train(cfg)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "cache").exists(), "the error came after data work"


# --- runs that would do nothing fail, with counts ---------------------------------------------


def test_a_corpus_smaller_than_one_batch_fails_with_counts(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(3):
        (docs / f"doc{i}.txt").write_text(f"Document {i}. " * 20)
    cfg = configure(
        tmp_path,
        "data=local",
        f"data.data_files={docs / '*.txt'}",
        "data.num_proc=1",
        "data.split_fractions={train: 0.34, validation: 0.33, test: 0.33}",
        "batch_size=64",
    )
    with pytest.raises(
        ConfigError,
        match=r"the train split has \d+ windows of context_length \+ 1 = 33 tokens, fewer than "
        r"one batch of batch_size=64 x 1 rank\(s\) = 64 windows\. Lower batch_size",
    ):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_missing_corpus_file_is_named_before_data_work(tmp_path):
    cfg = configure(tmp_path, "data=local", f"data.data_files={tmp_path / 'none' / '*.jsonl'}")
    with pytest.raises(ConfigError, match=r"data.data_files pattern .*none/\*\.jsonl.* no file"):
        train(cfg)
    assert not (tmp_path / "cache").exists()


# --- the NaN guard keeps only finite states --------------------------------------------------


class SpoilsStep3(Callback):
    """Makes step 3's gradients NaN, or its weights infinite after the optimizer step."""

    def __init__(self, what: str):
        self.what = what

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.what == "gradients" and trainer.global_step == 2:
            next(pl_module.parameters()).grad.fill_(float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.what == "weights" and trainer.global_step == 3:
            with torch.no_grad():
                next(pl_module.parameters())[0, 0] = float("inf")


def spoiled_callbacks(what: str):
    """build_callbacks with the spoiler first, so that it acts before the guard looks."""
    from longctx.train import run

    build = run.build_callbacks

    def with_spoiler(cfg, output_dir):
        callbacks, last = build(cfg, output_dir)
        return [SpoilsStep3(what), *callbacks], last

    return with_spoiler


@pytest.mark.parametrize(
    "what,message",
    [
        (
            "gradients",
            r"\d+ of \d+ parameter tensors' gradients \(e.g. model\.embed\.weight\)",
        ),
        ("weights", r"1 of \d+ weight tensors \(e.g. model\.embed\.weight\)"),
    ],
)
def test_non_finite_steps_are_never_checkpointed(tmp_path, monkeypatch, what, message):
    from longctx.train import run

    monkeypatch.setattr(run, "build_callbacks", spoiled_callbacks(what))
    cfg = configure(tmp_path, "trainer.max_steps=6", "checkpoint_every_n_steps=1")
    with pytest.raises(
        NonFiniteStepError,
        match=rf"{message} hold NaN or inf after optimizer step 3 .*stopped before any checkpoint "
        r"of them was written, the last good checkpoint is .*last\.ckpt "
        r"\(its weights verified finite\).*Lower optim\.lr",
    ):
        train(cfg)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert load_checkpoint(checkpoints / "last.ckpt")["global_step"] == 2
    for path in checkpoints.glob("*.ckpt"):
        saved = load_checkpoint(path)
        assert saved["global_step"] <= 2
        assert all(torch.isfinite(v).all() for v in saved["state_dict"].values())


def test_the_advice_after_a_non_finite_step_works_on_resume(tmp_path, monkeypatch):
    from longctx.train import run

    with monkeypatch.context() as patch:
        patch.setattr(run, "build_callbacks", spoiled_callbacks("gradients"))
        with pytest.raises(NonFiniteStepError, match="Lower optim.lr"):
            train(configure(tmp_path, "trainer.max_steps=5", "checkpoint_every_n_steps=1"))
    train(configure(tmp_path, "trainer.max_steps=5", "ckpt_path=last", "optim.lr=1e-4"))
    resumed = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == 5
    assert resumed["optimizer_states"][0]["param_groups"][0]["initial_lr"] == 1e-4
    assert all(torch.isfinite(v).all() for v in resumed["state_dict"].values())


def test_a_last_checkpoint_that_is_not_finite_is_not_called_good(tmp_path):
    from longctx.train.callbacks import NonFiniteGuard

    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"model.w": torch.tensor([1.0, float("nan")])}}, path)
    guard = NonFiniteGuard(SimpleNamespace(last_model_path=str(path)))
    assert guard._last_good_checkpoint() == (
        f"but the last checkpoint {path} holds non-finite weights too (1 tensors, e.g. "
        "model.w): resume from an earlier checkpoint"
    )
