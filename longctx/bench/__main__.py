"""`python -m longctx.bench [key=value ...]`:
the Hydra entry point (settings in conf/bench.yaml)."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from longctx.bench.config import bare_values_as_lists
from longctx.bench.environment import REPO_ROOT
from longctx.bench.memory import run_memory
from longctx.bench.memory_plan import run_plan
from longctx.bench.run import run_bench, run_sanity
from longctx.core.cli import errors_in_one_line, quiet_known_noise
from longctx.errors import ConfigError

log = logging.getLogger("longctx.bench")
BENCH_MODES = ("time", "memory", "plan")  # what each does: conf/bench.yaml


@hydra.main(config_path=str(REPO_ROOT / "conf"), config_name="bench", version_base="1.3")
def main(cfg: DictConfig) -> None:
    quiet_known_noise()
    with errors_in_one_line():
        _run(cfg)


def _run(cfg: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    settings = bare_values_as_lists(OmegaConf.to_container(cfg, resolve=True))
    if cfg.mode not in BENCH_MODES:
        raise ConfigError(f"mode={cfg.mode!r} is not valid; choose one of {list(BENCH_MODES)}")
    if cfg.mode == "memory":
        run_memory(settings, out_dir)
    elif cfg.mode == "plan":
        print("\n".join(run_plan(settings)))
    elif cfg.sanity:
        result = run_sanity(settings, out_dir)
        if "bench_ms" not in result:
            log.error("sanity: the bench could not measure SDPA: %s", result["bench_row"]["reason"])
            return
        log.info("sanity: %s", result["call"])
        log.info(
            "sanity: bench %.2f ms, plain timeit %.2f ms (%+.1f%%): %s",
            result["bench_ms"],
            result["timeit_ms"],
            100 * result["relative_difference"],
            "agree within 20%" if result["agree"] else "DISAGREE by more than 20%",
        )
    else:
        run_bench(settings, out_dir)


if __name__ == "__main__":
    main()
