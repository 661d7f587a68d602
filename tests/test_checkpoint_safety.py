"""Checkpoints load safely: nothing is unpickled, from a local file or a URL, and every fault of
a checkpoint path is a one-line ConfigError before any data work, in train.py and eval.py."""

from __future__ import annotations

import functools
import http.server
import json
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SMALL_RUN, compose_config
from hydra.core.hydra_config import HydraConfig

from longctx.checkpoints import SCHEMA_KEY, SHARDED_METADATA_FILE
from longctx.errors import ConfigError
from longctx.jobs import evaluate, train

EVAL_LIGHT = [
    "eval.context_lengths=[16,32]",
    "eval.max_tokens=128",
    "eval.strides=[null]",
    "eval.prefix_ablation.enabled=false",
    "eval.passkey.enabled=false",
    "eval.fact_recall.enabled=false",
]


class WritesMarker:
    """Unpickling this creates the file `path`: the proof that a loader executed a payload."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A real longctx checkpoint: a tiny model after 2 steps."""
    out = tmp_path_factory.mktemp("trained") / "run"
    cfg = compose_config(
        *SMALL_RUN,
        "trainer.max_steps=2",
        f"paths.root_dir={ROOT}",
        f"paths.output_dir={out}",
        f"data.cache_dir={out.parent / 'cache'}",
    )
    HydraConfig.instance().set_config(cfg)
    train(cfg)
    return out / "checkpoints" / "last.ckpt"


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "payload_ran"
    yield path
    assert not path.exists(), "a checkpoint's pickled payload was executed"


@pytest.fixture
def served(tmp_path):
    """A folder served over http on 127.0.0.1 (its URL), as a user's checkpoint server would."""
    folder = tmp_path / "served"
    folder.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def write_payload(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": WritesMarker(marker)}, path)
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def edited(trained: Path, target: Path, edit: Callable[[dict], None]) -> Path:
    contents = torch.load(trained, map_location="cpu", weights_only=True)
    edit(contents)
    torch.save(contents, target)
    return target


def without_training_state(contents: dict) -> None:
    for key in ("optimizer_states", "lr_schedulers", "loops"):
        contents.pop(key)


def another_projects_checkpoint(contents: dict) -> None:
    contents["hyper_parameters"] = {"learning_rate": 0.1, "hidden": 64}


def widened_embedding(contents: dict) -> None:
    key = next(k for k in contents["state_dict"] if k.endswith("embed.weight"))
    weight = contents["state_dict"][key]
    contents["state_dict"][key] = torch.zeros(weight.shape[0] + 1, weight.shape[1])


def truncated(trained: Path, target: Path) -> Path:
    target.write_bytes(trained.read_bytes()[: trained.stat().st_size // 2])
    return target


def foreign_zip(target: Path) -> Path:
    with zipfile.ZipFile(target, "w") as archive:
        archive.writestr("notes.txt", "not a checkpoint")
    return target


def sharded_folder(trained: Path, target: Path) -> Path:
    target.mkdir()
    edited(trained, target / SHARDED_METADATA_FILE, lambda c: c.pop("state_dict"))
    return target


def dangling_link(target: Path) -> Path:
    target.symlink_to(target.parent / "gone.ckpt")
    return target


# name -> (how to make the path from (tmp_path, trained checkpoint, marker, (folder, url)),
#          the message, and which entry points it applies to)
FAULTS: dict[str, tuple[Callable, str, tuple[str, ...]]] = {
    "missing file": (lambda t, c, m, s: t / "nope.ckpt", r"no such file", ("train", "eval")),
    "missing folder": (
        lambda t, c, m, s: t / "nowhere" / "last.ckpt",
        r"no such file \(folder .* does not exist either\)",
        ("train", "eval"),
    ),
    "a folder": (lambda t, c, m, s: t, r"is a folder", ("train", "eval")),
    "dangling symlink": (
        lambda t, c, m, s: dangling_link(t / "link.ckpt"),
        r"no such file",
        ("train", "eval"),
    ),
    "empty file": (
        lambda t, c, m, s: (t / "empty.ckpt", (t / "empty.ckpt").write_bytes(b""))[0],
        r"is empty \(0 bytes\)",
        ("train", "eval"),
    ),
    "truncated": (
        lambda t, c, m, s: truncated(c, t / "half.ckpt"),
        r"cannot be read as a checkpoint .*truncated",
        ("train", "eval"),
    ),
    "text file": (
        lambda t, c, m, s: (t / "notes.ckpt", (t / "notes.ckpt").write_text("hello\n"))[0],
        r"cannot be read as a checkpoint",
        ("train", "eval"),
    ),
    "zip of another kind": (
        lambda t, c, m, s: foreign_zip(t / "archive.ckpt"),
        r"cannot be read as a checkpoint",
        ("train", "eval"),
    ),
    "a bare tensor": (
        lambda t, c, m, s: (t / "t.ckpt", torch.save(torch.zeros(3), t / "t.ckpt"))[0],
        r"holds a Tensor, not a checkpoint",
        ("train", "eval"),
    ),
    "a dict without weights": (
        lambda t, c, m, s: (t / "d.ckpt", torch.save({"epoch": 1}, t / "d.ckpt"))[0],
        r"not a Lightning checkpoint \(it has no state_dict\)",
        ("train", "eval"),
    ),
    "pickled payload (torch.save)": (
        lambda t, c, m, s: write_payload(t / "payload.ckpt", m),
        r"needs unpickling code to load \(.*GLOBAL .*open\), so it was not loaded",
        ("train", "eval"),
    ),
    "pickled payload (plain pickle)": (
        lambda t, c, m, s: (
            t / "p.pkl",
            (t / "p.pkl").write_bytes(pickle.dumps({"a": WritesMarker(m)}, protocol=2)),
        )[0],
        r"needs unpickling code to load",
        ("train", "eval"),
    ),
    "another project's Lightning checkpoint": (
        lambda t, c, m, s: edited(c, t / "other.ckpt", another_projects_checkpoint),
        r"a Lightning checkpoint but not longctx's",
        ("train", "eval"),
    ),
    "a future schema version": (
        lambda t, c, m, s: edited(c, t / "future.ckpt", lambda x: x.update({SCHEMA_KEY: 99})),
        r"checkpoint schema 99, newer than the 1 this code reads",
        ("train", "eval"),
    ),
    "weights that do not fit the config": (
        lambda t, c, m, s: edited(c, t / "wide.ckpt", widened_embedding),
        r"weights do not fit the model its config describes .*embed\.weight has shape",
        ("train", "eval"),
    ),
    "weights without training state": (
        lambda t, c, m, s: edited(c, t / "weights.ckpt", without_training_state),
        r"holds no training state .*optimizer_states",
        ("train",),
    ),
    "a sharded folder": (
        lambda t, c, m, s: sharded_folder(c, t / "sharded.ckpt"),
        r"sharded \(FSDP\) checkpoint: consolidate it",
        ("eval",),
    ),
    "http 404": (lambda t, c, m, s: f"{s[1]}/missing.ckpt", r"HTTP 404", ("train", "eval")),
    "http, nothing listening": (
        lambda t, c, m, s: f"http://127.0.0.1:{free_port()}/last.ckpt",
        r"could not be downloaded \(.*refused",
        ("train", "eval"),
    ),
    "http, not a checkpoint": (
        lambda t, c, m, s: (f"{s[1]}/page.ckpt", (s[0] / "page.ckpt").write_text("<html>"))[0],
        r"cannot be read as a checkpoint",
        ("train", "eval"),
    ),
    "http, pickled payload": (
        lambda t, c, m, s: (f"{s[1]}/x.ckpt", write_payload(s[0] / "x.ckpt", m))[0],
        r"needs unpickling code to load",
        ("train", "eval"),
    ),
}
CASES = [
    pytest.param(name, entry, id=f"{entry}: {name}")
    for name, (_, _, entries) in FAULTS.items()
    for entry in entries
]


def run_entry(entry: str, tmp_path: Path, ckpt_path: str) -> Path:
    """train or evaluate in-process with `ckpt_path`; returns the folder data work would use."""
    data = tmp_path / "data_work"
    if entry == "train":
        overrides = [*SMALL_RUN, f"data.cache_dir={data}", f"paths.output_dir={tmp_path / 'run'}"]
        cfg = compose_config(*overrides, f"paths.root_dir={ROOT}", f"ckpt_path='{ckpt_path}'")
        HydraConfig.instance().set_config(cfg)
        train(cfg)
    else:
        cfg = compose_config(
            "~logger",
            f"paths.root_dir={ROOT}",
            f"paths.data_dir={data}",
            f"paths.output_dir={tmp_path / 'eval'}",
            f"ckpt_path='{ckpt_path}'",
            config_name="eval",
        )
        HydraConfig.instance().set_config(cfg)
        evaluate(cfg)
    return data


@pytest.mark.parametrize("fault,entry", CASES)
def test_every_checkpoint_fault_is_a_clear_error_before_data(
    fault, entry, tmp_path, trained, marker, served
):
    make, message, _ = FAULTS[fault]
    cases = tmp_path / "cases"
    cases.mkdir()
    path = make(cases, trained, marker, served)
    with pytest.raises(ConfigError, match=message) as error:
        run_entry(entry, tmp_path, str(path))
    assert f"ckpt_path={path}" in str(error.value)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "data_work").exists(), "the error came after data work"


@pytest.mark.skipif(
    os.name != "posix" or os.geteuid() == 0, reason="root reads files whatever their mode"
)
@pytest.mark.parametrize("entry", ["train", "eval"])
def test_an_unreadable_checkpoint_is_a_clear_error(entry, tmp_path, trained):
    path = tmp_path / "locked.ckpt"
    path.write_bytes(trained.read_bytes())
    path.chmod(0)
    with pytest.raises(ConfigError, match=r"cannot be read \(Permission denied\)"):
        run_entry(entry, tmp_path, str(path))


def test_a_served_checkpoint_resumes_and_evaluates(tmp_path, trained, served):
    """The URL path is not only refusals: a real checkpoint over http loads (weights only)."""
    folder, url = served
    (folder / "last.ckpt").write_bytes(trained.read_bytes())
    cache = trained.parents[2] / "cache"
    cfg = compose_config(
        *SMALL_RUN,
        "trainer.max_steps=3",
        f"paths.root_dir={ROOT}",
        f"paths.output_dir={tmp_path / 'run'}",
        f"data.cache_dir={cache}",
        f"ckpt_path={url}/last.ckpt",
    )
    HydraConfig.instance().set_config(cfg)
    train(cfg)
    resumed = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 3

    cfg = compose_config(
        "~logger",
        f"paths.root_dir={ROOT}",
        f"paths.data_dir={cache.parent}",
        f"paths.output_dir={tmp_path / 'eval'}",
        f"ckpt_path={url}/last.ckpt",
        *EVAL_LIGHT,
        config_name="eval",
    )
    HydraConfig.instance().set_config(cfg)
    evaluate(cfg)
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["checkpoint"] == f"{url}/last.ckpt"
    assert not list(Path(tempfile.gettempdir()).glob("longctx-ckpt-*")), "a download was left"


@pytest.mark.parametrize("script", ["train.py", "eval.py"])
def test_entry_points_refuse_a_served_payload_in_one_line_and_leave_no_run_dir(
    script, tmp_path, marker, served
):
    folder, url = served
    write_payload(folder / "model.ckpt", marker)
    logs = tmp_path / "logs"
    overrides = SMALL_RUN if script == "train.py" else ["~logger"]
    done = subprocess.run(
        [
            sys.executable,
            script,
            *overrides,
            f"ckpt_path={url}/model.ckpt",
            f"paths.log_dir={logs}",
            f"paths.data_dir={tmp_path / 'data'}",
        ],
        cwd=ROOT,
        env={**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    last_line = done.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ckpt_path=http://127.0.0.1:")
    assert "needs unpickling code" in last_line
    assert not [p for p in logs.rglob("*") if p.is_dir() and p.parent.name == "runs"]
    assert not (tmp_path / "data").exists()
