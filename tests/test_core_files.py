"""The one atomic writer (longctx/core/files.py): whole files, usual modes, no leftovers."""

from __future__ import annotations

import os

import pytest

from longctx.core.files import atomic_write, atomic_write_text, remove_stale_partials


def test_a_new_file_gets_the_mode_a_plain_open_would_give(tmp_path):
    umask = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "results.json", "{}")
    finally:
        os.umask(umask)
    assert (tmp_path / "results.json").stat().st_mode & 0o777 == 0o640


def test_a_replaced_file_keeps_its_mode(tmp_path):
    target = tmp_path / "metrics.csv"
    target.write_text("old")
    target.chmod(0o604)
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert target.stat().st_mode & 0o777 == 0o604


def test_a_failed_write_leaves_the_old_file_and_no_partial(tmp_path):
    target = tmp_path / "last.ckpt"
    target.write_text("old")

    def fail(handle):
        handle.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, fail)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_stale_partials_of_killed_writers_are_removed(tmp_path):
    (tmp_path / ".last.ckpt.abc123.partial").write_text("killed mid-write")
    (tmp_path / "last.ckpt").write_text("whole")
    removed = remove_stale_partials(tmp_path)
    assert [p.name for p in removed] == [".last.ckpt.abc123.partial"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
