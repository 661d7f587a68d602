"""The bench's `load` setting: competing processes that always stop, and the loaded columns."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, TINY_BENCH
from omegaconf import OmegaConf

from longctx.bench import load, report, run, worker
from longctx.bench.config import settings_from_config
from longctx.bench.isolation import IsolatedRunner
from longctx.bench.report import CSV_COLUMNS, add_ratios, add_slowdowns
from longctx.errors import ConfigError

LOADED_COLUMNS = ("time_ms_loaded", "slowdown", "slowdown_vs_sdpa")
TINY = {  # one small backend, one short length, fp32, one timed call
    **TINY_BENCH,
    "backends": ["full"],
    "lengths": [32],
    "modes": ["fwd_bwd"],
    "kernel": "auto",
    "load": 1,
}
ORPHAN_DEADLINE_S = 60  # how long an orphaned busy process may take to notice (a liveness bound)


def alive(pid: int) -> bool:
    """Whether pid runs (a zombie, dead but not yet reaped by its new parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class RecordedLoads(load.CompetingLoad):
    """CompetingLoad that remembers every instance, so a test sees pids even after a raise."""

    started: list[load.CompetingLoad] = []

    def start(self) -> None:
        RecordedLoads.started.append(self)
        super().start()


@pytest.fixture
def recorded(monkeypatch) -> list[load.CompetingLoad]:
    RecordedLoads.started = []
    monkeypatch.setattr(run, "CompetingLoad", RecordedLoads)
    return RecordedLoads.started


def started_pids(loads: list[load.CompetingLoad]) -> list[int]:
    return [pid for competing in loads for pid in competing.pids]


# ------------------------------------------------------------ settings


def test_load_and_threads_settings_are_checked_and_threads_sweep():
    settings = settings_from_config({**TINY, "threads": [1, 2]}, {})
    assert settings.load == 1
    assert [(c.subject, c.threads) for c in settings.configs()] == [
        ("sdpa", 1),
        ("full", 1),
        ("sdpa", 2),
        ("full", 2),
    ]
    assert {c.threads for c in settings_from_config({**TINY, "threads": 2}, {}).configs()} == {2}
    assert settings_from_config({**TINY, "threads": None}, {}).threads == (None,)
    assert settings_from_config({k: v for k, v in TINY.items() if k != "load"}, {}).load == 0
    for bad in (-1, 1.5, "one", True):
        with pytest.raises(ConfigError, match="load=.* competing CPU-bound processes"):
            settings_from_config({**TINY, "load": bad}, {})
    for bad in (0, [1, 0], [], "two"):
        with pytest.raises(ConfigError, match=r"threads=.*list of counts such as \[1,2\]"):
            settings_from_config({**TINY, "threads": bad}, {})
    conf = OmegaConf.load(ROOT / "conf" / "bench.yaml")
    assert conf.load == 0 and conf.threads is None  # off by default


# ------------------------------------------------------------ the competing processes


def test_a_load_runs_its_processes_inside_the_block_only():
    with load.CompetingLoad(2) as competing:
        assert len(competing.pids) == 2 and all(alive(pid) for pid in competing.pids)
        assert competing.alive() == competing.pids
    assert not any(alive(pid) for pid in competing.pids)
    assert competing.alive() == [] and competing not in load._running
    competing.stop()  # again: nothing left to do, no error


@pytest.mark.parametrize("error", [RuntimeError("forced"), KeyboardInterrupt()])
def test_a_load_stops_when_its_block_raises(error):
    with pytest.raises(type(error)):
        with load.CompetingLoad(1) as competing:
            assert alive(competing.pids[0])
            raise error
    assert not alive(competing.pids[0])


def test_a_process_that_never_spins_is_an_error_and_nothing_is_left(monkeypatch):
    monkeypatch.setattr(load, "BUSY_LOOP", "import sys; sys.exit(3)")
    competing = load.CompetingLoad(2)
    with pytest.raises(load.CompetingLoadError, match="did not start.*load=0"):
        competing.start()
    assert competing.pids and not any(alive(pid) for pid in competing.pids)
    assert competing not in load._running


def _holder() -> tuple[subprocess.Popen, int]:
    """A Python process that starts a one-process load and waits; and that process's pid."""
    script = (  # load.py alone (standard library only): no package import, so no torch to load
        "import importlib.util, sys, time\n"
        f"spec = importlib.util.spec_from_file_location('load', {str(Path(load.__file__))!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "competing = module.CompetingLoad(1)\n"
        "competing.start()\n"
        "print(competing.pids[0], flush=True)\n"
        "time.sleep(600)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    busy = int(holder.stdout.readline())
    assert alive(busy)
    return holder, busy


def test_sigterm_stops_the_load_before_the_bench_dies():
    holder, busy = _holder()
    holder.send_signal(signal.SIGTERM)
    assert holder.wait(timeout=60) == -signal.SIGTERM  # the signal's own action still happens
    assert not alive(busy)


def test_a_load_whose_parent_is_killed_outright_ends_itself():
    """SIGKILL runs no handler of the bench: the busy process notices its parent is gone."""
    holder, busy = _holder()
    holder.kill()
    holder.wait(timeout=60)
    deadline = time.monotonic() + ORPHAN_DEADLINE_S
    while alive(busy) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(busy)


# ------------------------------------------------------------ the bench under load (scripted)


class ScriptedRunner:
    """Stands in for IsolatedRunner: idle calls take 1 ms (SDPA) or 2 ms (full), calls under a
    competing load twice (SDPA) or three times (full) as long; `loaded_status` scripts a failed
    loaded run and `loaded_error` one that raises."""

    def __init__(self, loaded_status: str = "ok", loaded_error: BaseException | None = None):
        self.loaded_status = loaded_status
        self.loaded_error = loaded_error
        self.calls: list[tuple[str, bool]] = []  # (subject, whose call ran under load)

    def run(self, config, timeout_s):
        under_load = bool(load._running) and all(c.alive() for c in load._running)
        self.calls.append((config.subject, under_load))
        if under_load and self.loaded_error is not None:
            raise self.loaded_error
        idle_ms = 1.0 if config.subject == "sdpa" else 2.0
        time_ms = idle_ms * (2.0 if config.subject == "sdpa" else 3.0) if under_load else idle_ms
        row = {**worker.base_row(config), "wall_s": 0.01, "memory_mib": 0.5}
        if under_load and self.loaded_status != "ok":
            return {**row, "status": self.loaded_status, "reason": "worker died with exit code -9"}
        return {**row, "time_ms": time_ms, "time_ms_min": time_ms, "times_ms": [time_ms]}


def test_each_configuration_is_timed_idle_then_under_load_and_compared_with_sdpa(recorded):
    settings = settings_from_config({**TINY, "rounds": 2}, {})
    runner = ScriptedRunner()
    timer = run.LoadedTimer(settings, runner)
    rows = run.measure_all(settings, timer)
    add_ratios(rows)
    add_slowdowns(rows)
    assert runner.calls == [("sdpa", False), ("sdpa", True), ("full", False), ("full", True)] * 2
    sdpa, full = rows
    assert (sdpa["time_ms_loaded"], sdpa["slowdown"], sdpa["slowdown_vs_sdpa"]) == (2.0, 2.0, 1.0)
    assert (full["time_ms_loaded"], full["slowdown"], full["slowdown_vs_sdpa"]) == (6.0, 3.0, 1.5)
    assert full["load"] == 1 and full["ratio_vs_sdpa"] == 2.0
    environment = timer.environment()
    assert environment["processes"] == 1 and environment["pids"] == started_pids(recorded)
    assert len(recorded) == 4  # one load per loaded timing, each stopped before the next idle one
    assert not any(alive(pid) for pid in environment["pids"])


def test_a_threads_sweep_compares_each_row_with_sdpa_at_its_own_thread_count(recorded):
    class ThreadScaledRunner(ScriptedRunner):
        """SDPA's times grow with the thread count, full's do not."""

        def run(self, config, timeout_s):
            row = super().run(config, timeout_s)
            row["threads"] = config.threads  # what a real worker measures after set_num_threads
            if config.subject == "sdpa":
                scaled = row["time_ms"] * config.threads
                row.update(time_ms=scaled, time_ms_min=scaled, times_ms=[scaled])
            return row

    settings = settings_from_config({**TINY, "threads": [1, 2]}, {})
    rows = run.measure_all(settings, run.LoadedTimer(settings, ThreadScaledRunner()))
    add_ratios(rows)
    add_slowdowns(rows)
    ratios = {(r["subject"], r["threads"]): r["ratio_vs_sdpa"] for r in rows}
    assert ratios == {("sdpa", 1): 1.0, ("full", 1): 2.0, ("sdpa", 2): 1.0, ("full", 2): 1.0}
    assert {(r["subject"], r["threads"]): r["slowdown_vs_sdpa"] for r in rows} == {
        ("sdpa", 1): 1.0,
        ("full", 1): 1.5,
        ("sdpa", 2): 1.0,
        ("full", 2): 1.5,
    }
    environment = {"device_name": "cpu", "torch": "x", "threads": [1, 2], "load": {"processes": 1}}
    markdown = report.markdown(rows, report.fits(rows), environment, [])
    for threads in (1, 2):
        assert f"### fwd_bwd, fp32, {threads} threads: time / memory" in markdown
        assert f"fwd_bwd, fp32, {threads} threads under load=1" in markdown
    assert "1, 2 threads" in markdown


def test_a_failed_loaded_run_keeps_the_idle_time_and_says_why(recorded):
    settings = settings_from_config(TINY, {})
    rows = run.measure_all(settings, run.LoadedTimer(settings, ScriptedRunner("error")))
    add_ratios(rows)
    add_slowdowns(rows)
    for row in rows:
        assert row["status"] == "ok" and row["time_ms"] is not None
        assert row["time_ms_loaded"] is None and row["slowdown"] is None
        assert row["reason"] == "under load=1: error: worker died with exit code -9"
    assert recorded and not any(alive(pid) for pid in started_pids(recorded))


def test_no_load_means_one_timing_and_no_process(recorded):
    settings = settings_from_config({**TINY, "load": 0}, {})
    runner = ScriptedRunner()
    rows = run.measure_all(settings, run.LoadedTimer(settings, runner))
    add_slowdowns(rows)
    assert runner.calls == [("sdpa", False), ("full", False)] and recorded == []
    assert all(row["time_ms_loaded"] is None and row["slowdown"] is None for row in rows)


# ------------------------------------------------------------ the whole bench under load=1


def _outputs(out_dir: Path) -> tuple[dict, list[dict], str]:
    document = json.loads((out_dir / "bench.json").read_text())
    with (out_dir / "bench.csv").open() as handle:
        table = list(csv.DictReader(handle))
    return document, table, (out_dir / "bench.md").read_text()


def test_load_one_writes_the_loaded_columns_and_leaves_no_process(tmp_path, recorded):
    rows = run.run_bench(TINY, tmp_path)
    pids = started_pids(recorded)
    assert len(pids) == 2  # one competing process for each of SDPA's and full's loaded timing
    assert not any(alive(pid) for pid in pids)  # stopped by the bench, not by exiting
    document, table, markdown = _outputs(tmp_path)
    assert [(r["subject"], r["status"]) for r in rows] == [("sdpa", "ok"), ("full", "ok")]
    for row in document["rows"]:
        assert all(math.isfinite(row[key]) and row[key] > 0 for key in LOADED_COLUMNS)
        assert row["load"] == 1
    assert document["rows"][0]["slowdown_vs_sdpa"] == 1.0  # SDPA against itself
    assert set(LOADED_COLUMNS) | {"load"} <= set(CSV_COLUMNS)
    assert all(math.isfinite(float(line[key])) for line in table for key in LOADED_COLUMNS)
    environment = document["environment"]["load"]
    assert environment["processes"] == 1 and environment["pids"] == pids
    assert {"load_average_1min_before", "load_average_1min_after"} <= set(environment)
    assert "fwd_bwd, fp32 under load=1 (competing CPU-bound processes)" in markdown
    assert any(
        note.startswith("load=1: each configuration was timed twice") for note in document["notes"]
    )


@pytest.mark.parametrize("error", [RuntimeError("forced failure"), KeyboardInterrupt()])
def test_a_failure_during_a_loaded_timing_leaves_no_process(tmp_path, recorded, monkeypatch, error):
    real_run = IsolatedRunner.run

    def run_then_fail_under_load(self, config, timeout_s):
        row = real_run(self, config, timeout_s)  # a real worker, under the real load
        if load._running:
            assert all(alive(pid) for pid in started_pids(recorded))
            raise error
        return row

    monkeypatch.setattr(IsolatedRunner, "run", run_then_fail_under_load)
    with pytest.raises(type(error)):
        run.run_bench(TINY, tmp_path)
    assert started_pids(recorded) and not any(alive(pid) for pid in started_pids(recorded))
    assert not load._running
