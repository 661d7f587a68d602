"""Cluster recipes as written: launchers, signals, one data preparation, the image, the walkthrough.

Nothing here reaches a cluster. The SLURM launcher is run through hydra-submitit-launcher's own
code up to the sbatch script it would submit; ranks are processes of this machine.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose_config
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from omegaconf import OmegaConf
from test_ops import HAS_SUBMITIT_LAUNCHER, dockerfile_instructions

from longctx.data.prepare import prepare
from longctx.jobs import separate_evaluation
from longctx.train.module import adamw_kernel
from longctx.train.sharding import FullyShardedStrategy

CLUSTER_DOC = ROOT / "docs" / "cluster.md"
needs_launcher = pytest.mark.skipif(
    not HAS_SUBMITIT_LAUNCHER,
    reason="hydra-submitit-launcher not installed (pip install -e '.[cluster]')",
)


def compare_gpu_slurm_command() -> list[str]:
    """compare_gpu's documented SLURM sweep (conf/experiment/compare_gpu.yaml's header)."""
    header = (ROOT / "conf/experiment/compare_gpu.yaml").read_text().replace("\\\n#", "")
    sweep = "experiment=compare_gpu hydra/launcher=slurm"
    line = next(line for line in header.splitlines() if sweep in line)
    words = shlex.split(line.lstrip("# "))
    return [re.sub(r"<\w+>", "gpu", word) for word in words[words.index("train.py") + 1 :]]


# --- compare_gpu and the launchers --------------------------------------------------------------


def test_compare_gpu_composes_with_the_local_launcher():
    cfg = compose_config("experiment=compare_gpu")
    assert cfg.hydra.launcher._target_.endswith("BasicLauncher")
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.devices == 1
    assert OmegaConf.to_container(cfg.trainer, resolve=False)["num_nodes"] == 1


@needs_launcher
def test_compare_gpu_with_the_slurm_launcher_asks_for_a_gpu_time_and_requeue():
    import longctx  # noqa: F401  (the resolvers of conf/paths)

    launcher = compose_config(*compare_gpu_slurm_command()).hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (1, 1, 1)
    assert launcher.timeout_min == 120 and launcher.max_num_timeout > 0
    assert launcher.additional_parameters.requeue is True
    assert launcher.partition == "gpu"


class Submitted(Exception):
    """Raised instead of submitting: carries the sbatch script the launcher built."""


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """An `srun` on PATH (submitit checks for it) and submission stopped at the sbatch script."""
    import submitit

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text("#!/bin/sh\nexit 0\n")
    srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    def stop(executor, fn, *iterables):
        raise Submitted(executor._executor._make_submission_file_text("COMMAND", "0"))

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", stop)


def sbatch_script(overrides: list[str], sweep_dir: Path) -> str:
    """The sbatch script hydra-submitit-launcher builds for `train.py -m <overrides>`."""
    import longctx  # noqa: F401

    cfg = compose_config(*overrides, f"hydra.sweep.dir={sweep_dir}")
    HydraConfig.instance().set_config(cfg)
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    with pytest.raises(Submitted) as submitted:
        launcher.launch([["seed=1"]], initial_job_idx=0)
    return str(submitted.value)


def sbatch_flags(script: str) -> dict[str, str | bool]:
    flags = {}
    for key, value in re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?$", script, re.M):
        flags[key] = value or True
    return flags


@needs_launcher
def test_the_compare_gpu_sbatch_script_requests_a_gpu_and_sigusr1(tmp_path, fake_slurm):
    flags = sbatch_flags(sbatch_script(compare_gpu_slurm_command(), tmp_path / "sweep"))
    assert flags["gpus-per-node"] == "1" and flags["ntasks-per-node"] == "1"
    assert flags["nodes"] == "1" and flags["time"] == "120"
    assert flags["signal"] == "USR1@120" and flags["requeue"] is True
    assert flags["partition"] == "gpu"


@needs_launcher
def test_a_multinode_sweep_sbatch_script_asks_for_every_gpu(tmp_path, fake_slurm):
    overrides = ["hydra/launcher=slurm", "trainer=multinode", "trainer.num_nodes=2"]
    flags = sbatch_flags(sbatch_script([*overrides, "trainer.devices=8"], tmp_path / "sweep"))
    assert (flags["nodes"], flags["ntasks-per-node"], flags["gpus-per-node"]) == ("2", "8", "8")
    assert flags["signal"].startswith("USR1@") and flags["requeue"] is True


def test_signals_agree_between_the_launcher_the_sbatch_recipe_and_lightning():
    """SLURM sends what Lightning's SLURMEnvironment listens for: SIGUSR1, in every recipe."""
    launcher = OmegaConf.load(ROOT / "conf/hydra/launcher/slurm.yaml")
    launcher_signal = launcher.additional_parameters.signal.split("@")[0]
    multinode = instantiate(compose_config("trainer=multinode").trainer.plugins[0])
    assert isinstance(multinode, SLURMEnvironment) and multinode.auto_requeue
    # Lightning detects SLURM under submitit (trainer=gpu names no environment) with defaults.
    detected = SLURMEnvironment()
    sbatch = dict(re.findall(r"#SBATCH --([\w-]+)=(\S+)", CLUSTER_DOC.read_text()))
    for requeue_signal in (multinode.requeue_signal, detected.requeue_signal):
        assert requeue_signal == signal.SIGUSR1
        assert getattr(signal, f"SIG{launcher_signal}") == requeue_signal
        assert sbatch["signal"].split("@")[0] == requeue_signal.name


# --- data preparation happens once ------------------------------------------------------------

PREPARING_RANK = """
import sys, time
from pathlib import Path
sys.path.insert(0, "tests")
from conftest import compose_config
import longctx.data.datamodule as datamodule
from longctx.data import build_datamodule

folder, rank = Path(sys.argv[1]), sys.argv[2]
tokenise = datamodule.build_token_cache

def counted(*args, **kwargs):
    # Tokenise only once the other rank is inside prepare_data too, so that both runs overlap.
    deadline = time.time() + 300
    while len(list(folder.glob("*.entered"))) < 2 and time.time() < deadline:
        time.sleep(0.05)
    with open(folder / "tokenisations", "a") as log:
        log.write(rank + "\\n")
    return tokenise(*args, **kwargs)

datamodule.build_token_cache = counted
data = build_datamodule(compose_config("model=tiny", f"data.cache_dir={folder / 'cache'}"), False)
(folder / f"{rank}.entered").touch()
data.prepare_data()
print(data.token_cache)
"""


def test_two_ranks_preparing_at_once_tokenise_once(tmp_path):
    """As srun or torchrun start them: both ranks call prepare_data at the same time."""
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", PREPARING_RANK, str(tmp_path), str(rank)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = [rank.communicate(timeout=600) for rank in ranks]
    for rank, (_, stderr) in zip(ranks, outputs):
        assert rank.returncode == 0, stderr[-3000:]
    assert len((tmp_path / "tokenisations").read_text().split()) == 1
    caches = {stdout.strip() for stdout, _ in outputs}
    assert len(caches) == 1 and Path(caches.pop()).is_dir()


def test_prepare_entry_point_builds_the_cache_a_run_reads(tmp_path):
    overrides = ["model=tiny", "context_length=32", f"data.cache_dir={tmp_path}"]
    cache = prepare([*overrides, "trainer=ddp", "attention=transformer_xl"])
    assert cache.is_dir() and (cache / "meta.json").is_file()
    assert prepare(overrides) == cache  # the same data settings find the same cache


# --- the image --------------------------------------------------------------------------------


def test_image_sets_writable_caches_for_any_uid():
    """`docker run --user <uid>` has no passwd entry and no writable home: torch's compile
    caches (whose default name asks the user database on the base image's torch) and the
    others must point at a folder every uid may write."""
    env = {}
    for instruction, args in dockerfile_instructions():
        if instruction == "ENV":
            env.update(dict(pair.split("=", 1) for pair in shlex.split(args)))
    for variable in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "MPLCONFIGDIR"):
        assert env[variable].startswith("/tmp/"), variable
    assert env["USER"]  # getpass.getuser() reads it before the user database
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    try:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(ROOT / "outputs" / "inductor-test")
        assert cache_dir() == str(ROOT / "outputs" / "inductor-test")
    finally:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR")
        if previous is not None:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous


# --- evaluation after a multi-GPU fit, the optimizer ------------------------------------------


def test_evaluation_after_a_multi_gpu_fit_is_its_own_job_with_its_command():
    assert "python eval.py ckpt_path=run/last.ckpt`" in separate_evaluation(
        "run/last.ckpt", DDPStrategy()
    )
    sharded = separate_evaluation("run/last.ckpt", FSDPStrategy())
    assert "consolidate_checkpoint run/last.ckpt" in sharded
    assert "eval.py ckpt_path=run/last.ckpt.consolidated" in sharded


def test_adamw_is_fused_on_cuda_only():
    assert adamw_kernel({"cuda"}) == {"fused": True}
    assert adamw_kernel({"cpu"}) == {"fused": False}
    assert adamw_kernel({"cuda", "cpu"}) == {"fused": False}
    parameters = [torch.nn.Parameter(torch.zeros(2))]
    assert torch.optim.AdamW(parameters, **adamw_kernel({"cpu"})).defaults["fused"] is False


def test_fsdp2_preset_builds_its_strategy_with_one_data_parallel_dimension():
    strategy = instantiate(compose_config("trainer=fsdp2").trainer.strategy)
    assert isinstance(strategy, FullyShardedStrategy)
    assert strategy._tensor_parallel_size == 1 and not strategy._save_distributed_checkpoint


# --- the walkthrough of docs/cluster.md -------------------------------------------------------


def doc_commands(program: str) -> list[list[str]]:
    """Arguments of every `<program> ...` in docs/cluster.md's bash blocks (also inside --wrap
    and srun), placeholders <...> filled."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", CLUSTER_DOC.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"<\w+>", "x", re.sub(r"\$\{?([A-Z_]+)\}?", r"\1", line.split(" # ")[0]))
            words = shlex.split(line)
            words = [w for word in words for w in (shlex.split(word) if " " in word else [word])]
            if program in words:
                arguments = words[words.index(program) + 1 :]
                found.append(arguments[: arguments.index("&&")] if "&&" in arguments else arguments)
    return found


def test_walkthrough_has_every_step_of_a_two_node_run():
    doc = CLUSTER_DOC.read_text()
    for step in ("docker build", "longctx.data.prepare", "sbatch", "ckpt_path=last", "eval.py"):
        assert step in doc, step
    assert doc_commands("longctx.data.prepare") and doc_commands("eval.py")
    assert any("mode=plan" in arguments for arguments in doc_commands("longctx.bench"))


def test_walkthrough_prepare_commands_compose():
    for arguments in doc_commands("longctx.data.prepare"):
        cfg = compose_config(*arguments)
        assert cfg.data.name and cfg.tokenizer.name


def test_walkthrough_eval_commands_compose():
    for arguments in doc_commands("eval.py"):
        cfg = compose_config(*arguments, config_name="eval")
        assert cfg.ckpt_path


def test_walkthrough_planner_commands_compose():
    for arguments in doc_commands("longctx.bench"):
        cfg = compose_config(*arguments, config_name="bench")
        assert cfg.mode in ("time", "memory", "plan")
