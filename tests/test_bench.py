"""The bench module (`python -m longctx.bench`) and the model-FLOPs counter."""

from __future__ import annotations

import csv
import dataclasses
import json
import mmap
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_BENCH, model_config
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from longctx import build_model, flops
from longctx.attention import ModelSettings, build_backend
from longctx.attention.full import FullAttention
from longctx.bench import allocator, anchors, environment, report, worker
from longctx.bench.config import Config, bare_values_as_lists, settings_from_config
from longctx.bench.isolation import IsolatedRunner
from longctx.bench.measure import time_calls
from longctx.bench.plan import Planner, extrapolate
from longctx.bench.run import run_sanity
from longctx.errors import ConfigError
from longctx.flops import (
    matmul_parameters,
    measured_matmul_flops,
    mfu,
    peak_flops,
    training_flops_per_token,
)
from longctx.ops.softmax.masked import pattern_mask

B, H, DH = 1, 2, 8
TINY = TINY_BENCH


def _config(**changes) -> Config:
    settings = settings_from_config({**TINY, "backends": ["full"]}, {})
    base = dict(subject="full", kind="backend", mode="fwd_bwd", dtype="fp32", seq_len=32)
    return dataclasses.replace(settings.template, **{**base, **changes})


# ------------------------------------------------------------ the whole entry point


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory) -> Path:
    """One tiny run through `python -m longctx.bench`, exactly as a user starts it."""
    out = tmp_path_factory.mktemp("bench") / "run"
    command = [
        sys.executable,
        "-m",
        "longctx.bench",
        "backends=[full]",
        "anchors=[]",
        "lengths=[32,64]",
        "dtypes=[fp32]",
        "modes=[fwd_bwd,decode]",
        f"heads={H}",
        f"head_dim={DH}",
        "repeats=1",
        "warmup=0",
        "decode_tokens=2",
        "prefill_chunk=16",
        "rounds=2",
        f"hydra.run.dir={out}",
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_outputs_exist_with_their_schema(bench_run):
    document = json.loads((bench_run / "bench.json").read_text())
    assert set(document) == {"environment", "settings", "rows", "fits", "notes"}
    expected = {
        "torch",
        "cpu",
        "threads",
        "device",
        "device_name",
        "git_commit",
        "allocator_env",
        "transparent_hugepage",
    }
    assert expected <= set(document["environment"])
    assert document["settings"]["lengths"] == [32, 64]
    rows = document["rows"]
    measured = {(r["subject"], r["mode"], r["seq_len"]) for r in rows}
    assert measured == {
        (s, m, n) for s in ("sdpa", "full") for m in ("fwd_bwd", "decode") for n in (32, 64)
    }
    assert all(r["status"] == "ok" and r["time_ms"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    assert set(report.CSV_COLUMNS) - {"options"} <= set(rows[0])
    with (bench_run / "bench.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0]) == report.CSV_COLUMNS and len(table) == len(rows)
    assert (bench_run / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (bench_run / "bench.md").read_text()
    assert "| implementation | N=32 | N=64 |" in markdown and "### fwd_bwd, fp32" in markdown
    assert "median over 2 rounds of each round's median" in markdown
    assert "cpu_allocator=default" in markdown and all(
        r["cpu_allocator"] == "default" for r in rows
    )
    assert all(r["faulted_mib"] >= 0 for r in rows)  # CPU: counted for every measured row
    assert "MiB page-faulted per call (fwd_bwd, fp32" in markdown
    fitted = {(f["subject"], f["mode"]): f for f in document["fits"]}
    assert fitted[("full", "fwd_bwd")]["time_exponent"] is not None
    assert fitted[("full", "decode")]["memory_exponent"] == pytest.approx(
        1.0
    )  # the KV cache grows with N


def test_rows_carry_ratios_memory_and_state(bench_run):
    rows = json.loads((bench_run / "bench.json").read_text())["rows"]
    by_key = {(r["subject"], r["mode"], r["seq_len"]): r for r in rows}
    for n in (32, 64):
        sdpa, full = by_key[("sdpa", "fwd_bwd", n)], by_key[("full", "fwd_bwd", n)]
        assert sdpa["ratio_vs_sdpa"] == 1.0
        # Two rounds: the ratio pairs each round's times, the time is the rounds' median.
        assert full["rounds"] == sdpa["rounds"] == 2
        paired = [t / b for t, b in zip(full["round_times_ms"], sdpa["round_times_ms"])]
        assert full["ratio_vs_sdpa"] == pytest.approx(sum(paired) / 2)
        assert full["time_ms"] == pytest.approx(sum(full["round_times_ms"]) / 2)
        # One call allocates at least the output and three input gradients (fp32).
        assert sdpa["peak_alloc_mib"] * 2**20 >= 4 * B * H * n * DH * 4
        # full's state after N tokens is its K and V cache: 2 x B x H x N x Dh fp32 numbers.
        decode = by_key[("full", "decode", n)]
        assert decode["state_elements"] == 2 * B * H * n * DH
        assert (
            decode["memory_mib"]
            == decode["state_mib"]
            == pytest.approx(2 * B * H * n * DH * 4 / 2**20)
        )
        assert by_key[("sdpa", "decode", n)]["state_elements"] == 2 * B * H * n * DH


# ------------------------------------------------------------ fits, planning, settings


def _measured_row(subject: str, round_times: list[float | None], memory: float = 1.0) -> list[dict]:
    row = {**worker.base_row(_config(subject=subject)), "wall_s": 1.0, "tokens_per_s": 1000.0}
    return [
        {
            **row,
            "time_ms": t,
            "time_ms_min": t,
            "times_ms": [t],
            "peak_alloc_mib": memory,
            "memory_mib": memory,
        }
        if t is not None
        else {**row, "status": "error", "reason": "died"}
        for t in round_times
    ]


def test_rounds_combine_into_medians_and_paired_ratios():
    sdpa = report.combine_rounds(_measured_row("sdpa", [100.0, 300.0, 200.0]))
    full = report.combine_rounds(_measured_row("full", [50.0, 60.0, 100.0]))
    assert (sdpa["time_ms"], full["time_ms"], full["rounds"]) == (200.0, 60.0, 3)
    assert full["tokens_per_s"] == pytest.approx(1000.0 * 50.0 / 60.0)  # rate of the combined time
    report.add_ratios([sdpa, full])
    # Round by round: 0.5, 0.2, 0.5 -> 0.5 (the ratio of the medians would say 0.3).
    assert full["ratio_vs_sdpa"] == pytest.approx(0.5)
    # A later round that failed drops out of both the median and the pairing.
    partial = report.combine_rounds(_measured_row("full", [50.0, None, 100.0]))
    assert (partial["rounds"], partial["round_times_ms"], partial["time_ms"]) == (
        2,
        [50.0, None, 100.0],
        75.0,
    )
    report.add_ratios([sdpa, partial])
    assert partial["ratio_vs_sdpa"] == pytest.approx(0.5)  # 0.5 and 0.5
    assert report.combine_rounds(_measured_row("full", [None]))["rounds"] == 0
    rounds = [
        {**row, "faulted_mib": mib}
        for row, mib in zip(_measured_row("full", [1.0, 2.0, 3.0]), (8.0, 0.0, 2.0))
    ]
    assert report.combine_rounds(rounds)["faulted_mib"] == 2.0  # the rounds' median


def test_fit_exponent_recovers_synthetic_powers():
    lengths = [1024, 4096, 16384, 65536]
    assert report.fit_exponent(lengths, [3e-6 * n**2 for n in lengths]) == pytest.approx(2.0)
    noisy = [0.5 * n * (1.1 if i % 2 else 0.9) for i, n in enumerate(lengths)]
    assert report.fit_exponent(lengths, noisy) == pytest.approx(1.0, abs=0.1)
    assert report.fit_exponent([1024], [1.0]) is None
    assert report.fit_exponent([1024, 4096], [1.0, None]) is None


def test_extrapolation_uses_the_last_two_points():
    assert extrapolate([(1024, 1.0), (4096, 4.0)], 16384, (1.0, 3.0)) == pytest.approx(16.0)
    assert extrapolate([(1024, 1.0)], 4096, (1.0, 3.0)) == pytest.approx(4.0)  # one point: N^1
    assert extrapolate([(1024, 1.0), (4096, 0.5)], 16384, (1.0, 3.0)) == pytest.approx(
        2.0
    )  # clamped


def _ok_row(config: Config, wall_s: float, memory_mib: float) -> dict:
    return {
        **worker.base_row(config),
        "wall_s": wall_s,
        "peak_alloc_mib": memory_mib,
        "status": "ok",
    }


def test_planner_skips_what_will_not_fit_and_says_why():
    planner = Planner(config_budget_s=10.5, total_budget_s=1000, memory_cap_mib=200)
    planner.record(_config(seq_len=1024), _ok_row(_config(seq_len=1024), wall_s=0.1, memory_mib=1))
    assert planner.skip_reason(_config(seq_len=1024, subject="linear")) is None  # another series
    planner.record(_config(seq_len=4096), _ok_row(_config(seq_len=4096), wall_s=1.0, memory_mib=10))
    reason = planner.skip_reason(_config(seq_len=16384))  # 10 s and 100 MiB predicted: fits
    assert reason is None
    assert "config_budget_s" in planner.skip_reason(_config(seq_len=65536))
    planner = Planner(config_budget_s=1000, total_budget_s=1000, memory_cap_mib=100)
    planner.record(_config(seq_len=1024), _ok_row(_config(seq_len=1024), wall_s=0.1, memory_mib=30))
    assert "memory_cap_mib" in planner.skip_reason(
        _config(seq_len=4096)
    )  # at least 30 MiB x 4 > 100
    failed = {
        **worker.base_row(_config(seq_len=1024)),
        "status": "error",
        "reason": "boom",
        "wall_s": 1,
    }
    planner.record(_config(seq_len=1024, dtype="bf16"), failed)
    assert "N=1024 was error (boom)" in planner.skip_reason(_config(seq_len=4096, dtype="bf16"))
    spent = Planner(config_budget_s=10, total_budget_s=0, memory_cap_mib=None)
    assert "total_budget_s" in spent.skip_reason(_config())


def test_settings_validate_before_anything_runs():
    settings = settings_from_config({**TINY, "anchors": ["local_attention"]}, {})
    configs = settings.configs()
    assert [c.seq_len for c in configs] == sorted(c.seq_len for c in configs)  # shortest first
    assert {c.subject for c in configs if c.mode == "decode"} == {"sdpa"} | {
        name for name, kind in settings.subjects if kind == "backend"
    }  # anchors have no decode
    assert settings.subjects[0] == ("sdpa", "baseline")
    with pytest.raises(ConfigError, match="backends"):
        settings_from_config({**TINY, "backends": ["no_such_backend"]}, {})
    with pytest.raises(ConfigError, match="modes"):
        settings_from_config({**TINY, "modes": ["sideways"]}, {})
    with pytest.raises(ConfigError, match="rounds=0 must be at least 1"):
        settings_from_config({**TINY, "rounds": 0}, {})
    with pytest.raises(ConfigError, match="options.full has unknown key"):
        settings_from_config({**TINY, "options": {"full": {"window": 3}}}, {})
    with pytest.raises(ConfigError, match="anchors"):
        settings_from_config(
            {**TINY, "anchors": ["flash_attn"]}, anchors.missing_anchors(["flash_attn"])
        )
    refused = r"cpu_allocator='jemalloc' is not valid; choose from \['default', 'retain'\]"
    with pytest.raises(ConfigError, match=refused):
        settings_from_config({**TINY, "cpu_allocator": "jemalloc"}, {})
    missing = settings_from_config(
        {**TINY, "anchors": ["fla_naive_linear"]}, {"fla_naive_linear": "absent"}
    )
    assert all(kind != "anchor" for _, kind in missing.subjects)


def test_list_settings_accept_one_bare_value():
    given = {**TINY, "backends": "full", "lengths": 64, "dtypes": "fp32", "modes": "fwd_bwd"}
    settings = settings_from_config(bare_values_as_lists(given), {})
    assert [name for name, kind in settings.subjects if kind == "backend"] == ["full"]
    assert settings.lengths == [64] and settings.dtypes == ["fp32"]
    assert bare_values_as_lists({"backends": "all"})["backends"] == "all"
    memory = bare_values_as_lists({"memory": {"models": "small", "backends": "all"}})["memory"]
    assert memory == {"models": ["small"], "backends": "all"}


def test_the_command_line_takes_a_bare_name_and_reports_a_mistake_in_one_line(tmp_path):
    """`backends=full` gets past the backends check (the old error was "['f','u','l','l'] is not
    valid"); the dtype mistake after it is one line on stderr and exit status 1."""
    command = [sys.executable, "-m", "longctx.bench", "backends=full", "dtypes=fp33"]
    command += [f"hydra.run.dir={tmp_path / 'bench'}"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert errors == [
        "error: dtypes=['fp33'] is not valid; choose from ['fp32', 'bf16', 'fp16', 'fp64']"
    ]


def test_missing_anchors_are_named_with_the_install_command(monkeypatch):
    monkeypatch.setattr(anchors.importlib.util, "find_spec", lambda name: None)
    assert anchors.missing_anchors(["local_attention"]) == {
        "local_attention": "local_attention is not installed (pip install local-attention)"
    }


# ------------------------------------------------------------ failures are recorded, never fatal


def test_a_length_above_max_len_is_a_skipped_row(monkeypatch):
    monkeypatch.setattr(FullAttention, "max_len", property(lambda self: 16))
    row = worker.measure(_config(seq_len=32))
    assert row["status"] == "skipped" and "max_len" in row["reason"]


def test_a_learned_position_table_is_sized_to_the_measured_length_unless_given():
    settings = settings_from_config(
        {
            **TINY,
            "backends": ["aft_full", "aft_local", "full"],
            "options": {"aft_local": {"max_len": 40}},
        },
        {},
    )
    sized = {(c.subject, c.mode, c.seq_len): c.options.get("max_len") for c in settings.configs()}
    assert (
        sized[("aft_full", "fwd_bwd", 64)] == 64
        and sized[("aft_full", "decode", 64)] == 64 + TINY["decode_tokens"]
    )
    assert sized[("aft_local", "fwd_bwd", 64)] == 40 and sized[("full", "fwd_bwd", 64)] is None
    # and a max_len given too short for decoding past the prefill is a skipped row,
    # not an IndexError
    row = worker.measure(
        next(
            c
            for c in settings.configs()
            if c.subject == "aft_local" and c.mode == "decode" and c.seq_len == 64
        )
    )
    assert row["status"] == "skipped" and "max_len" in row["reason"]


@pytest.mark.parametrize(
    "error, status, reason",
    [
        (
            RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 9 GB"),
            "skipped",
            "over memory_cap_mib",
        ),
        (MemoryError(), "skipped", "over memory_cap_mib"),
        (RuntimeError("shape mismatch"), "error", "RuntimeError: shape mismatch"),
        (KeyError("x"), "error", "KeyError"),
    ],
)
def test_exceptions_become_rows(monkeypatch, error, status, reason):
    def broken(config):
        raise error

    monkeypatch.setattr(worker, "build_workload", broken)
    row = worker.measure(_config())
    assert row["status"] == status and reason in row["reason"]


def test_out_of_memory_under_retain_names_the_heap_and_the_fixes(monkeypatch):
    def too_big(config):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 64 MB")

    monkeypatch.setattr(worker, "build_workload", too_big)
    monkeypatch.setattr(
        worker, "configure_cpu_allocator", lambda name: None
    )  # keep this process's malloc as is
    row = worker.measure(_config(cpu_allocator="retain"))
    assert row["status"] == "skipped" and "over memory_cap_mib" in row["reason"]
    assert "raise memory_cap_mib or use cpu_allocator=default" in row["reason"]


@pytest.fixture(scope="module")
def runner() -> IsolatedRunner:
    return IsolatedRunner()


def test_fresh_process_measures_and_a_hung_worker_is_killed(runner):
    row = runner.run(_config(subject="sdpa", kind="baseline"), timeout_s=120)
    assert row["status"] == "ok", row["reason"]
    assert row["peak_rss_mib"] is not None
    killed = runner.run(_config(seq_len=4096, mode="fwd_bwd"), timeout_s=0.01)
    assert killed["status"] == "skipped" and "killed after" in killed["reason"]


# A 64 MiB tensor written and freed, then a 48 MiB one written (both over glibc's largest automatic
# mmap threshold, 32 MiB): the page faults of the second write, in a fresh interpreter. The second
# is smaller so that it fits the freed block whatever the alignment padding: an aligned request
# of the same size needs a little more than the block it freed, and may or may not find it.
REFAULT_PROBE = """
import resource, sys, torch
from longctx.bench.allocator import configure_cpu_allocator
configure_cpu_allocator(sys.argv[1])
torch.empty(16, 1 << 20).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.empty(12, 1 << 20).fill_(1.0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(allocator._mallopt() is None, reason="glibc's malloc only")
@pytest.mark.parametrize("name, refaulted", [("default", True), ("retain", False)])
def test_cpu_allocator_decides_whether_freed_memory_is_faulted_again(name, refaulted):
    done = subprocess.run(
        [sys.executable, "-c", REFAULT_PROBE, name],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    pages = (48 << 20) // 4096
    faults = int(done.stdout.split()[-1])
    assert (faults > pages // 2) if refaulted else (faults < pages // 16), faults


def test_timed_calls_count_the_pages_each_call_faults():
    pages = 2048

    def map_and_touch_fresh_pages():
        with mmap.mmap(-1, pages * mmap.PAGESIZE) as fresh:  # anonymous: mapped on first touch
            fresh[:: mmap.PAGESIZE] = b"x" * pages

    calls = time_calls(map_and_touch_fresh_pages, warmup=1, repeats=3, device=torch.device("cpu"))
    assert len(calls.seconds) == 3 and all(pages <= n < 2 * pages for n in calls.minor_faults), (
        calls
    )
    quiet = time_calls(lambda: None, warmup=0, repeats=3, device=torch.device("cpu"))
    assert max(quiet.minor_faults) < pages // 16, quiet


@pytest.mark.parametrize("content, mode", [("always [madvise] never\n", "madvise"), (None, None)])
def test_transparent_hugepage_mode_is_the_bracketed_one(tmp_path, monkeypatch, content, mode):
    policy = tmp_path / "enabled"
    if content is not None:
        policy.write_text(content)
    monkeypatch.setattr(environment, "TRANSPARENT_HUGEPAGE", policy)
    assert environment.transparent_hugepage_mode() == mode


def test_retain_is_refused_before_any_work_where_libc_has_no_mallopt(monkeypatch):
    monkeypatch.setattr(allocator, "_mallopt", lambda: None)
    with pytest.raises(ConfigError, match="needs glibc's mallopt.*use cpu_allocator=default"):
        settings_from_config({**TINY, "cpu_allocator": "retain"}, {})


def test_a_retain_worker_measures_and_records_its_allocator(runner):
    row = runner.run(
        _config(subject="sdpa", kind="baseline", cpu_allocator="retain"), timeout_s=120
    )
    assert row["status"] == "ok", row["reason"]
    assert row["cpu_allocator"] == "retain"


def test_sanity_mode_reports_both_figures(tmp_path):
    result = run_sanity({**TINY, "lengths": [64]}, tmp_path)
    assert "bench_ms" in result, result["bench_row"]["reason"]
    assert result["bench_ms"] > 0 and result["timeit_ms"] > 0
    assert result["agree"] == (abs(result["bench_ms"] / result["timeit_ms"] - 1) <= 0.2)
    assert json.loads((tmp_path / "sanity.json").read_text())["bench_ms"] == result["bench_ms"]


@pytest.mark.parametrize("name", sorted(anchors.ANCHORS))
def test_installed_anchors_run_at_the_bench_shapes(name):
    if anchors.missing_anchors([name]):
        pytest.skip(f"{name} is not installed")
    row = worker.measure(_config(subject=name, kind="anchor", mode="fwd", seq_len=512))
    assert row["status"] == "ok", row["reason"]
    assert row["peak_alloc_mib"] > 0


# ------------------------------------------------------------ FLOPs


def test_full_attention_flops_count_the_causal_pairs():
    dims = ModelSettings(n_layer=1, n_head=4, d_model=64, context_length=40)
    backend = build_backend({"name": "full"}, dims)
    pos = torch.arange(37)
    pairs = int(pattern_mask(lambda h, i, j: j <= i, 1, pos, pos).sum())  # 37 * 38 / 2
    # Per allowed (i, j): a q.k dot and a p*v axpy over d_model, each 2 FLOPs per element.
    assert backend.attention_flops(37) == 2 * 2 * pairs * 64


def test_training_flops_per_token_of_the_tiny_model():
    model = build_model(model_config("full"), vocab_size=37)  # 2 layers, d=64, MLP 4x, tied head
    per_layer = 64 * 3 * 64 + 64 * 64 + 64 * 256 + 256 * 64
    assert matmul_parameters(model) == 2 * per_layer + 37 * 64
    n = 16
    attention = 2 * (2 * 2 * (n * (n + 1) / 2) * 64)  # two layers of causal QK^T and PV
    assert training_flops_per_token(model, n) == pytest.approx(
        6 * (2 * per_layer + 37 * 64) + 3 * attention / n
    )


def test_six_n_matches_torch_flop_counter_on_the_linear_layers():
    """torch's FlopCounterMode (which does not count SDPA on CPU)
    sees exactly 6 x weights x tokens."""
    model = build_model(model_config("full"), vocab_size=37)
    ids = torch.randint(0, 37, (2, 16))
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
    assert counter.get_total_flops() == 6 * matmul_parameters(model) * ids.numel()


def test_peak_flops(monkeypatch):
    assert measured_matmul_flops(torch.float32, size=128, repeats=1) > 0
    monkeypatch.setattr(flops, "measured_matmul_flops", lambda dtype: {torch.float32: 3e11}[dtype])
    assert peak_flops("cpu", torch.float32) == 3e11  # CPUs: a measured matmul, not a datasheet
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert peak_flops("cuda", torch.bfloat16) == 989e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert peak_flops("cuda", torch.bfloat16) == 756e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    assert peak_flops("cuda", torch.bfloat16) is None
    assert mfu(1000.0, 1e9, 2e12) == pytest.approx(0.5)
    assert mfu(1000.0, 1e9, None) is None
