"""Reading a run's checkpoint: tensors and plain values only, never pickled code.

A longctx checkpoint is a Lightning checkpoint whose hyper-parameters hold the run's resolved
config (plain dicts and lists) and the vocabulary size, so the model can be rebuilt from the
file alone. Every read goes through `read_checkpoint`, which loads with `weights_only=True`:
a file that would need unpickling arbitrary objects is refused rather than executed. A URL is
downloaded to a temporary file first and loaded the same way (Lightning's own loader turns
`weights_only` off for http paths, so it is never handed a URL).

`inspect_checkpoint` checks a path before any data work: it exists, is readable, is a longctx
checkpoint of a schema this code reads, its weights fit the model its config describes, and
(for a resume) it holds the training state. Every fault is a ConfigError naming the path.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from longctx.data.tokenizer import Tokenizer, tokenizer_from_state
from longctx.errors import ConfigError
from longctx.model import LanguageModel, build_model

# LightningModule attribute that holds the LanguageModel: its weights are prefixed with it.
MODEL_PREFIX = "model."
# Written into every checkpoint (longctx.train.callbacks.CheckpointSchemaStamp). Bump it when
# the layout changes in a way older code cannot read; files without it predate the stamp and
# have the layout of version 1.
CHECKPOINT_SCHEMA_VERSION = 1
SCHEMA_KEY = "longctx_checkpoint_schema"
# The run's tokenizer as plain strings (longctx.data.tokenizer's to_state), so that a checkpoint
# turns into text without the run's data cache. Absent in checkpoints written before it and in
# runs on generated token ids (data=mqar).
TOKENIZER_KEY = "longctx_tokenizer"
# What Lightning needs besides the weights to continue training where the checkpoint stopped.
TRAINING_STATE_KEYS = ("global_step", "optimizer_states", "lr_schedulers", "loops")
# A sharded checkpoint's non-tensor part, beside the shards (Lightning's FSDP layout).
SHARDED_METADATA_FILE = "meta.pt"
DOWNLOAD_TIMEOUT_S = 120
_HTTP_PREFIXES = ("http://", "https://")


@dataclass(frozen=True)
class CheckpointInfo:
    """What a validated checkpoint says about its run."""

    cfg: dict[str, Any]  # the run's resolved config
    vocab_size: int
    global_step: int | None  # None for a checkpoint without training state


def is_url(path: str | os.PathLike) -> bool:
    return "://" in str(path)


@contextmanager
def local_checkpoint(path: str | os.PathLike) -> Iterator[Path]:
    """`path` as a local file: itself, or a temporary download of a URL (removed afterwards)."""
    if not is_url(path):
        yield Path(path).expanduser()
        return
    folder = Path(tempfile.mkdtemp(prefix="longctx-ckpt-"))
    try:
        local = folder / "downloaded.ckpt"
        _download(str(path), local)
        yield local
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _download(url: str, target: Path) -> None:
    if not url.startswith(_HTTP_PREFIXES):
        _download_with_fsspec(url, target)
        return
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            with open(target, "wb") as handle:
                shutil.copyfileobj(response, handle)
    except urllib.error.HTTPError as error:
        raise ConfigError(
            f"ckpt_path={url} could not be downloaded: HTTP {error.code} {error.reason}; "
            "check the URL, or download the file and pass its local path"
        ) from None
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise ConfigError(
            f"ckpt_path={url} could not be downloaded ({reason}); "
            "check the URL, or download the file and pass its local path"
        ) from None


def _download_with_fsspec(url: str, target: Path) -> None:
    """Object stores and other remote filesystems (s3://, gs://, ...) through fsspec."""
    import fsspec

    try:
        with fsspec.open(url, "rb") as source, open(target, "wb") as handle:
            shutil.copyfileobj(source, handle)
    except Exception as error:  # each filesystem package raises its own types
        raise ConfigError(
            f"ckpt_path={url} could not be downloaded ({type(error).__name__}: {error}); "
            "check the URL and that the filesystem's package is installed, or download the "
            "file and pass its local path"
        ) from None


def read_checkpoint(path: str | os.PathLike, *, mmap: bool = False) -> dict[str, Any]:
    """The checkpoint's contents on the CPU, loaded without unpickling code.

    mmap=True maps tensors from the file instead of reading them (local zip checkpoints), so a
    check of the structure costs no memory and little time however large the file is.
    """
    with local_checkpoint(path) as local:
        return _load(local, str(path), mmap)


def _load(local: Path, shown: str, mmap: bool) -> dict[str, Any]:
    _check_readable_file(local, shown)
    try:
        contents = torch.load(
            local,
            map_location="cpu",
            weights_only=True,
            mmap=mmap and zipfile.is_zipfile(local),
        )
    except pickle.UnpicklingError as error:
        unsafe = [line.strip() for line in str(error).splitlines() if "Unsupported global" in line]
        if unsafe:
            what = unsafe[0].removeprefix("WeightsUnpickler error: ").split(" was not")[0]
            raise ConfigError(
                f"ckpt_path={shown} needs unpickling code to load ({what}), so it was not "
                "loaded: longctx checkpoints hold only tensors and plain values. Use a "
                "checkpoint written by longctx's train.py"
            ) from None
        raise _not_a_checkpoint(shown, error) from None
    except Exception as error:  # torch reports a damaged file with many types
        raise _not_a_checkpoint(shown, error) from None
    if not isinstance(contents, dict):
        raise ConfigError(
            f"ckpt_path={shown} holds a {type(contents).__name__}, not a checkpoint; "
            "pass a .ckpt file written by longctx's train.py"
        )
    return contents


def _check_readable_file(local: Path, shown: str) -> None:
    if not local.exists():
        hint = "" if local.parent.is_dir() else f" (folder {local.parent} does not exist either)"
        raise ConfigError(
            f"ckpt_path={shown}: no such file{hint}; pass the path of a .ckpt file "
            "(or, for train.py, ckpt_path=last with hydra.run.dir=<run dir>)"
        )
    if local.is_dir():
        raise ConfigError(
            f"ckpt_path={shown} is a folder; pass a checkpoint file inside it, such as "
            f"{local / 'checkpoints' / 'last.ckpt'}"
        )
    try:
        with open(local, "rb") as handle:
            handle.read(1)
    except OSError as error:
        raise ConfigError(
            f"ckpt_path={shown} cannot be read ({error.strerror}); "
            "check its permissions or pass another file"
        ) from None
    if local.stat().st_size == 0:
        raise ConfigError(
            f"ckpt_path={shown} is empty (0 bytes), e.g. a copy that never finished; "
            "pass a complete checkpoint"
        )


def _not_a_checkpoint(shown: str, error: BaseException) -> ConfigError:
    detail = (str(error).strip().splitlines() or [""])[0][:200]
    return ConfigError(
        f"ckpt_path={shown} cannot be read as a checkpoint ({type(error).__name__}: {detail}); "
        "it is truncated or not a file written by torch.save. Pass a complete .ckpt file "
        "written by longctx's train.py"
    )


def inspect_checkpoint(
    path: str | os.PathLike, *, shown: str | None = None, for_resume: bool = False
) -> CheckpointInfo:
    """Validate a local checkpoint without loading its tensors: a ConfigError for every fault.

    `shown` names it in messages (the URL it was downloaded from, say). For a resume, a sharded
    checkpoint (FSDP: a folder of per-rank shards and the metadata file) is checked through its
    metadata; its shards are read by torch.distributed.checkpoint when training restores them.
    """
    shown = str(path) if shown is None else shown
    local = Path(path)
    sharded = local.is_dir() and (local / SHARDED_METADATA_FILE).is_file()
    if sharded and not for_resume:
        raise ConfigError(
            f"ckpt_path={shown} is a sharded (FSDP) checkpoint: consolidate it into one file with "
            f"`python -m lightning.pytorch.utilities.consolidate_checkpoint {shown}` and pass "
            "the result"
        )
    if sharded:
        contents = _load(local / SHARDED_METADATA_FILE, shown, mmap=True)
    else:
        contents = _load(local, shown, mmap=True)
    return checkpoint_info(contents, shown, for_resume=for_resume, sharded=sharded)


def checkpoint_info(
    contents: dict[str, Any], shown: str, *, for_resume: bool = False, sharded: bool = False
) -> CheckpointInfo:
    """The run recorded in loaded checkpoint contents, after checking they are longctx's.

    `sharded`: the metadata of a sharded checkpoint, whose weights and optimizer state are in
    the shards beside it.
    """
    if not sharded and not isinstance(contents.get("state_dict"), dict):
        raise ConfigError(
            f"ckpt_path={shown} is not a Lightning checkpoint (it has no state_dict); "
            "pass a .ckpt file written by longctx's train.py"
        )
    hparams = contents.get("hyper_parameters")
    if (
        not isinstance(hparams, dict)
        or not isinstance(hparams.get("cfg"), dict)
        or not isinstance(hparams.get("vocab_size"), int)
    ):
        raise ConfigError(
            f"ckpt_path={shown} is a Lightning checkpoint but not longctx's: its hyper-parameters "
            "hold no run config (cfg) and vocab_size. Pass a checkpoint written by longctx's "
            "train.py"
        )
    schema = contents.get(SCHEMA_KEY, 1)
    if not isinstance(schema, int) or schema > CHECKPOINT_SCHEMA_VERSION:
        raise ConfigError(
            f"ckpt_path={shown} has checkpoint schema {schema!r}, newer than the "
            f"{CHECKPOINT_SCHEMA_VERSION} this code reads; update longctx to read it"
        )
    cfg, vocab_size = hparams["cfg"], hparams["vocab_size"]
    if not sharded:
        _check_weights_fit_the_config(contents["state_dict"], cfg, vocab_size, shown)
    global_step = contents.get("global_step")
    if for_resume:
        needed = [k for k in TRAINING_STATE_KEYS if not (sharded and k == "optimizer_states")]
        missing = [key for key in needed if key not in contents]
        if missing:
            raise ConfigError(
                f"ckpt_path={shown} holds no training state ({', '.join(missing)} missing), so "
                "training cannot continue from it; evaluate it with eval.py, or resume from a "
                "checkpoints/last.ckpt"
            )
    return CheckpointInfo(cfg, vocab_size, global_step if isinstance(global_step, int) else None)


def _check_weights_fit_the_config(
    state_dict: dict[str, Any], cfg: dict[str, Any], vocab_size: int, shown: str
) -> None:
    """The weights are those of the model the config describes (built on the meta device)."""
    try:
        with torch.device("meta"):
            expected = {
                MODEL_PREFIX + key: tuple(value.shape)
                for key, value in build_model(cfg, vocab_size).state_dict().items()
            }
    except Exception as error:  # an edited config can fail anywhere in the model's constructor
        raise ConfigError(
            f"ckpt_path={shown}: its run config is not valid for this version of longctx "
            f"({type(error).__name__}: {error})"
        ) from None
    found = {
        key: tuple(value.shape)
        for key, value in state_dict.items()
        if key.startswith(MODEL_PREFIX) and isinstance(value, torch.Tensor)
    }
    problems = [f"missing {key}" for key in sorted(expected.keys() - found.keys())]
    problems += [f"unexpected {key}" for key in sorted(found.keys() - expected.keys())]
    problems += [
        f"{key} has shape {list(found[key])}, expected {list(expected[key])}"
        for key in sorted(expected.keys() & found.keys())
        if found[key] != expected[key]
    ]
    if problems:
        listed = "; ".join(problems[:3]) + (
            f"; and {len(problems) - 3} more" if problems[3:] else ""
        )
        raise ConfigError(
            f"ckpt_path={shown}: its weights do not fit the model its config describes "
            f"({listed}); the file was edited or damaged"
        )


def model_from_checkpoint(
    path: str | os.PathLike,
) -> tuple[LanguageModel, dict[str, Any], Tokenizer | None]:
    """The trained LanguageModel (fp32, on the CPU), the run's config dict and the tokenizer
    stored with it (None for checkpoints written before tokenizers were stored, or on data=mqar)."""
    checkpoint = read_checkpoint(path)
    info = checkpoint_info(checkpoint, str(path))
    return model_from_contents(checkpoint, info), info.cfg, stored_tokenizer(checkpoint)


def stored_tokenizer(checkpoint: dict[str, Any]) -> Tokenizer | None:
    """The tokenizer train.py stored in the checkpoint's contents, if it stored one."""
    state = checkpoint.get(TOKENIZER_KEY)
    return tokenizer_from_state(state) if isinstance(state, dict) else None


def model_from_contents(checkpoint: dict[str, Any], info: CheckpointInfo) -> LanguageModel:
    """The LanguageModel (fp32) of loaded, validated checkpoint contents."""
    model = build_model(info.cfg, info.vocab_size)
    weights = {
        key.removeprefix(MODEL_PREFIX): value
        for key, value in checkpoint["state_dict"].items()
        if key.startswith(MODEL_PREFIX)
    }
    model.load_state_dict(weights)
    return model.float()


def non_finite_weights(path: str | os.PathLike) -> list[str]:
    """Names of the checkpoint's weight tensors that hold NaN or infinity."""
    state_dict = read_checkpoint(path, mmap=True)["state_dict"]
    return [
        key
        for key, value in state_dict.items()
        if isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and not bool(torch.isfinite(value).all())
    ]
