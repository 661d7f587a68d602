"""Evaluation runs: every metric on the test split, written to the run directory; or a report.

`evaluate_model` is what train.py runs after a fit (longctx.jobs); `evaluate_checkpoint` rebuilds a
checkpoint's model and data for eval.py; `run_eval` is eval.py's dispatch (report or checkpoint).
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from longctx.checkpoints import model_from_checkpoint
from longctx.core.device import resolve_device
from longctx.data import build_datamodule
from longctx.data.mqar import MQARDataModule
from longctx.errors import ConfigError
from longctx.eval.mqar import mqar_sections
from longctx.eval.outputs import log_to_wandb, write_results
from longctx.eval.progress import Progress
from longctx.eval.scoring import Scorer
from longctx.eval.sections import EVAL_SECTIONS, EvalContext, stream_digest
from longctx.eval.settings import EvalSettings, eval_settings, settings_dict
from longctx.eval.token_bytes import byte_counter

log = logging.getLogger(__name__)


@contextmanager
def _timed(timings: dict, section: str):
    start = time.perf_counter()
    yield
    timings[section] = round(time.perf_counter() - start, 3)


def document_offsets(datamodule, split: str = "test") -> np.ndarray:
    """Where each document starts in the split's stream (its EOS included), plus the length."""
    lengths = [len(d) + 1 for d in datamodule.split_documents(split)]
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def evaluate_model(model, datamodule, cfg, output_dir: Path, checkpoint: str | None = None) -> dict:
    """Every section of `cfg.eval` on the test split; writes results.{json,csv}, units.json,
    section CSVs and PNGs, and logs one line per section with its progress.

    On data=mqar (a recall probe, not a corpus) the sections are MQAR's own (longctx.eval.mqar).
    """
    settings = eval_settings(cfg.get("eval"))
    started = datetime.now(timezone.utc)
    scorer = Scorer(model.to(resolve_device(settings.device)).eval(), settings.autocast)
    if isinstance(datamodule, MQARDataModule):
        timings = {}
        with _timed(timings, "mqar"):
            sections = mqar_sections(scorer, datamodule, settings.batch_size, settings.bootstrap)
        meta = _meta(cfg, datamodule, scorer, settings, checkpoint, started, timings)
        return _write(output_dir, meta | {"tokenizer": "none"}, sections, {}, timings)
    stream = np.asarray(datamodule.split_tokens("test"), dtype=np.int64)
    ctx = EvalContext(
        scorer=scorer,
        datamodule=datamodule,
        settings=settings,
        train_length=int(cfg["context_length"]),
        count_bytes=byte_counter(datamodule.tokenizer),
        stream=stream,
        offsets=document_offsets(datamodule),
    )
    active = [section for section in EVAL_SECTIONS if section.applies(ctx)]
    progress = Progress(len(active))
    sections: dict[str, list] = {}
    units: dict[str, list] = {}
    timings, work = {}, {}
    for section in active:
        total, unit, what = section.plan(ctx)
        before = ctx.scorer.forward_tokens
        with _timed(timings, section.name), progress.section(section.name, total, unit, what):
            result = section.run(ctx, progress)
        work[section.name] = ctx.scorer.forward_tokens - before
        for key, rows in result.sections.items():
            sections.setdefault(key, []).extend(rows)
        for key, rows in result.units.items():
            units.setdefault(key, []).extend(rows)

    meta = _meta(cfg, datamodule, scorer, settings, checkpoint, started, timings) | {
        "tokenizer": datamodule.tokenizer.name,
        "test_tokens": int(len(ctx.stream)),
        "test_documents": int(len(ctx.offsets) - 1),
        "test_utf8_bytes": int(datamodule.split_utf8_bytes("test")),
        "test_digest": stream_digest(ctx.stream),
        "eval_forward_tokens": work,
    }
    return _write(output_dir, meta, sections, units, timings)


def _write(output_dir, meta: dict, sections: dict, units: dict, timings: dict) -> dict:
    """results.json, units.json, CSVs, plots and wandb; returns what evaluate_model returns."""
    paths = write_results(Path(output_dir), meta, sections, units)
    log_to_wandb(sections, paths)
    _log_summary(sections, timings)
    log.info("evaluation results: %s", paths["json"])
    return {
        "meta": meta,
        "rows": sections.get("perplexity", []),
        "sections": sections,
        "paths": paths,
    }


def _meta(cfg, datamodule, scorer, settings: EvalSettings, checkpoint, started, timings) -> dict:
    """What every results.json records; the corpus's own counts are added by the caller."""
    trainer = cfg.get("trainer") or {}
    return {
        "attention": cfg["attention"]["name"],
        "attention_options": _plain(cfg["attention"]),
        "model": _plain(cfg["model"]),
        "parameters": sum(p.numel() for p in scorer.model.parameters()),
        "train_context_length": int(cfg["context_length"]),
        "train": {
            "max_steps": trainer.get("max_steps"),
            "batch_size": cfg.get("batch_size"),
            "precision": trainer.get("precision"),
            "seed": cfg.get("seed"),
            "lr": (cfg.get("optim") or {}).get("lr"),
        },
        "data": cfg["data"]["name"],
        "vocab_size": datamodule.vocab_size,
        "split": "test",
        "checkpoint": checkpoint,
        "eval_settings": settings_dict(settings),
        "eval_seconds": timings,
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "code_version": _code_version(),
    }


def _plain(node):
    return (
        OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    )


def _code_version() -> str | None:
    """`git describe` of the checkout the package runs from (with -dirty), or None outside git."""
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _interval(row: dict, key: str) -> str:
    low, high = row.get(f"{key}_low"), row.get(f"{key}_high")
    return "" if low is None or high is None else f" [{low:.4f}, {high:.4f}]"


def _log_summary(sections: dict, timings: dict) -> None:
    for row in sections.get("mqar", []):
        log.info(
            "mqar %-10s seq_len %4d pairs %3d accuracy %s %s",
            row["split"],
            row["seq_len"],
            row["num_pairs"],
            _fmt(row["accuracy"]),
            row["skipped"] or "",
        )
    for row in sections.get("perplexity", []):
        log.info(
            "ctx %5d %-9s ppl %s%s bpb %s, %d documents, %.1f%% of the split %s",
            row["context_length"],
            row["protocol"],
            _fmt(row["ppl"]),
            _interval(row, "ppl"),
            _fmt(row["bpb"]),
            row["documents"],
            100 * (row["split_share"] or 0),
            row["skipped"] or "",
        )
    for row in sections.get("prefix_ablation", []):
        log.info(
            "prefix %5d loss %s%s %s",
            row["prefix_length"],
            _fmt(row["loss"]),
            _interval(row, "loss"),
            row["skipped"] or "",
        )
    passkey = [r for r in sections.get("passkey", []) if r["accuracy"] is not None]
    if passkey:
        log.info(
            "passkey %d of %d trials correct over %d cells",
            sum(r["correct"] for r in passkey),
            sum(r["trials"] for r in passkey),
            len(passkey),
        )
    for row in sections.get("streaming_memory", []):
        log.info(
            "streaming positions %d-%d loss %.4f with state, %.4f fresh",
            row["position_start"],
            row["position_end"] - 1,
            row["loss_with_state"],
            row["loss_fresh_state"],
        )
    for row in sections.get("fact_recall", []):
        log.info(
            "fact recall ctx %d distance %s: %d/%d correct%s",
            row["context_length"],
            row["distance"],
            row["correct"],
            row["docs"],
            _interval(row, "accuracy"),
        )
    log.info("evaluation seconds: %s", timings)


def evaluate_checkpoint(cfg: DictConfig) -> dict:
    """eval.py: rebuild the model and data of a checkpoint's run, then evaluate with `cfg.eval`."""
    eval_settings(cfg.eval)  # a bad setting fails here, before the checkpoint and data load
    model, saved_cfg, tokenizer = model_from_checkpoint(cfg.ckpt_path)
    run_cfg = OmegaConf.create(saved_cfg)
    run_cfg.eval = cfg.eval
    # Data and tokenizer must be the checkpoint's (the vocabulary depends on them): the tokenizer
    # stored in the checkpoint is used as it is, never rebuilt from a cache that may differ; only
    # where caches live may differ between machines.
    run_cfg.data.cache_dir = cfg.paths.data_dir + "/cache"
    datamodule = build_datamodule(run_cfg, ordered_stream=False, tokenizer=tokenizer)
    datamodule.prepare_data()
    datamodule.setup("test")
    _start_logger(cfg)
    return evaluate_model(
        model, datamodule, run_cfg, Path(cfg.paths.output_dir), str(cfg.ckpt_path)
    )


def _start_logger(cfg: DictConfig) -> None:
    os.environ.setdefault("WANDB_MODE", "offline")  # online only when the user asks for it
    if cfg.get("logger"):
        from hydra.utils import instantiate

        logger = instantiate(cfg.logger)
        _ = logger.experiment  # starts the wandb run so tables and images are logged to it


def _command_line(program: str) -> str | None:
    """The command line of this Hydra job (None outside one)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return " ".join([program, *(shlex.quote(o) for o in HydraConfig.get().overrides.task)])


def run_eval(cfg: DictConfig) -> dict:
    """eval.py: `report.runs=...` writes a comparison report;
    otherwise `ckpt_path=...` is evaluated."""
    if cfg.get("report") and cfg.report.get("runs"):
        from longctx.eval.report import write_report

        _start_logger(cfg)
        return write_report(cfg.report, Path(cfg.paths.output_dir), _command_line("python eval.py"))
    if not cfg.get("ckpt_path"):
        raise ConfigError(
            "eval.py needs ckpt_path=<checkpoint> to evaluate one, "
            "or report.runs=[<run dirs>] to compare runs"
        )
    return evaluate_checkpoint(cfg)
