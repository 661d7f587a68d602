"""The bench run: plan, measure each configuration in a fresh process, write the outputs."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from longctx.bench import anchors, report
from longctx.bench.config import Config, Settings, settings_from_config
from longctx.bench.environment import describe, load_average
from longctx.bench.isolation import IsolatedRunner
from longctx.bench.load import CompetingLoad
from longctx.bench.plan import Planner
from longctx.bench.sanity import sanity_check
from longctx.bench.worker import base_row

log = logging.getLogger("longctx.bench")

NOTES = [
    "Each configuration ran in a fresh process forked from a server that had imported torch "
    "but computed nothing, so no allocator cache or high-water mark carries over between "
    "configurations.",
    "memory_mib: allocator peak of one call above the bytes live before it (CPU: the allocator's "
    "alloc/free events from torch.profiler(profile_memory=True), kernels' scratch buffers "
    "included; CUDA: max_memory_allocated); for decode: the streaming state's size after N tokens. "
    "peak_rss_mib: the worker's resident-set high-water mark minus its resident set at start "
    "(inputs, weights and allocator slack included). faulted_mib (CPU): median over the timed "
    "calls of the pages each call page-faulted (minor faults x page size): memory the C allocator "
    "had handed back to the OS and the call had to have mapped again (see cpu_allocator).",
    "fwd_bwd uses loss = out.sum(); bf16 casts inputs and weights (no autocast) except train_step.",
    "time_ms: median of `repeats` timed calls; with rounds > 1, the median of the rounds' medians. "
    "ratio_vs_sdpa: the median over rounds of the row's time over SDPA's in the same round.",
]
LOAD_NOTE = (
    "load={n}: each configuration was timed twice in a row, in fresh processes: idle (time_ms), "
    "then while {n} competing process(es) spun on arithmetic, started by the bench just before "
    "and killed just after (time_ms_loaded). slowdown: loaded / idle time, the median over rounds "
    "of each round's pair; slowdown_vs_sdpa: the row's slowdown over SDPA's at the same N, dtype, "
    "mode and thread count. 'idle' means without the bench's own load: other work on the machine "
    "shows in the load averages."
)


def _timeout_s(settings: Settings) -> float:
    return 2 * settings.config_budget_s + 60


def _runner(settings: Settings) -> IsolatedRunner:
    # Importing transformers takes seconds: do it once in the forkserver, not in every worker.
    preload = [
        anchors.ANCHORS[name].preload for name, kind in settings.subjects if kind == "anchor"
    ]
    return IsolatedRunner(extra_preload=preload)


def _summary(row: dict[str, Any]) -> str:
    head = f"{row['subject']} {row['mode']} {row['dtype']} N={row['seq_len']}"
    if row["status"] != "ok":
        return f"{head}: {row['status']}: {row['reason']}"
    if row["mode"] == "launches":
        return f"{head} kernel={row['kernel']}: {row['kernel_launches']} launches"
    loaded = row.get("time_ms_loaded")
    return (
        f"{head}: {row['time_ms']:.3g} ms"
        + (f", under load {loaded:.3g} ms" if loaded is not None else "")
        + f", {row['memory_mib']:.3g} MiB ({row['wall_s']:.1f} s)"
    )


class LoadedTimer:
    """Runs configurations, each a second time under `settings.load` competing processes, and
    keeps what the environment notes need: every pid started, the 1-minute load average before
    the first loaded timing and after the last."""

    def __init__(self, settings: Settings, runner: IsolatedRunner):
        self.settings = settings
        self.runner = runner
        self.pids: list[int] = []
        self.load_average_before: float | None = None
        self.load_average_after: float | None = None

    def run(self, config: Config) -> dict[str, Any]:
        """The configuration's row; under load, with time_ms_loaded (None if the loaded run
        failed, its reason then in the row's reason)."""
        row = self.runner.run(config, _timeout_s(self.settings))
        if not self.settings.load or row["status"] != "ok" or config.mode == report.COUNTED:
            return row
        if self.load_average_before is None:
            self.load_average_before = _one_minute_load()
        with CompetingLoad(self.settings.load) as load:
            self.pids += load.pids
            loaded = self.runner.run(config, _timeout_s(self.settings))
        self.load_average_after = _one_minute_load()
        if loaded["status"] == "ok":
            row["time_ms_loaded"] = loaded["time_ms"]
        else:
            row["reason"] = (
                f"under load={self.settings.load}: {loaded['status']}: {loaded['reason']}"
            )
        return row

    def environment(self) -> dict[str, Any]:
        return {
            "processes": self.settings.load,
            "pids": self.pids,
            "load_average_1min_before": self.load_average_before,
            "load_average_1min_after": self.load_average_after,
        }


def _one_minute_load() -> float | None:
    averages = load_average()
    return averages[0] if averages else None


def measure_all(settings: Settings, timer: LoadedTimer) -> list[dict[str, Any]]:
    """One row per configuration, combined over `settings.rounds` passes over all of them.

    The first pass decides what is skipped; later passes re-measure what ran, in the same order,
    so a slow drift of the machine's speed (on a shared VM, 10-20% over minutes) reaches SDPA
    and the backends of one length alike, and each round gives a paired ratio.
    """
    planner = Planner(
        settings.config_budget_s, settings.total_budget_s, settings.template.memory_cap_mib
    )
    configs = settings.configs()
    rounds: list[list[dict[str, Any]]] = []  # per configuration, its row of each round
    for index, config in enumerate(configs, 1):
        reason = planner.skip_reason(config)
        if reason is None:
            row = timer.run(config)
        else:
            row = {**base_row(config), "status": "skipped", "reason": reason, "wall_s": 0.0}
        planner.record(config, row)
        rounds.append([row])
        log.info("[%d/%d] %s", index, len(configs), _summary(row))
    later = [  # counts are exact: only timed rows are measured again
        (number, config, rows)
        for number in range(2, settings.rounds + 1)
        for config, rows in zip(configs, rounds)
        if rows[0]["status"] == "ok" and config.mode != "launches"
    ]
    for number, config, rows in later:
        spent = planner.budget_spent()
        if spent:
            log.info("round %d/%d stopped: %s", number, settings.rounds, spent)
            break
        rows.append(timer.run(config))
        log.info("[round %d/%d] %s", number, settings.rounds, _summary(rows[-1]))
    return [{**report.combine_rounds(rows), "load": settings.load} for rows in rounds]


def run_bench(cfg: Mapping[str, Any], out_dir: Path) -> list[dict[str, Any]]:
    """Measure everything cfg asks for and write bench.json/.csv/.md/.png into out_dir."""
    missing = anchors.missing_anchors(list(cfg["anchors"] or []))
    settings = settings_from_config(cfg, missing)
    threads = list(settings.threads) if len(settings.threads) > 1 else settings.threads[0]
    environment = describe(settings.template.device, threads)
    timer = LoadedTimer(settings, _runner(settings))
    rows = measure_all(settings, timer)
    environment["load_average_end"] = load_average()
    environment["load"] = timer.environment()
    report.add_ratios(rows)
    report.add_slowdowns(rows)
    fitted = report.fits(rows)
    notes = NOTES + ([LOAD_NOTE.format(n=settings.load)] if settings.load else [])
    notes += [f"anchor {name} not run: {why}" for name, why in missing.items()]
    out_dir.mkdir(parents=True, exist_ok=True)
    report.write_json(out_dir / "bench.json", environment, dict(cfg), rows, fitted, notes)
    report.write_csv(out_dir / "bench.csv", rows)
    (out_dir / "bench.md").write_text(report.markdown(rows, fitted, environment, notes))
    report.plot(out_dir / "bench.png", rows)
    log.info("wrote bench.json, bench.csv, bench.md, bench.png to %s", out_dir)
    return rows


def run_sanity(cfg: Mapping[str, Any], out_dir: Path) -> dict[str, Any]:
    settings = settings_from_config({**cfg, "anchors": []}, {})
    result = sanity_check(settings, IsolatedRunner(), _timeout_s(settings))
    result["environment"] = describe(settings.template.device, settings.template.threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sanity.json").write_text(json.dumps(result, indent=2, default=str))
    return result
