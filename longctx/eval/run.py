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
import torch
from omegaconf import DictConfig, OmegaConf

from longctx.checkpoints import model_from_checkpoint
from longctx.core.device import resolve_device
from longctx.data import build_datamodule
from longctx.data.mqar import MQARDataModule
from longctx.errors import ConfigError
from longctx.eval.fact_recall import fact_recall, planted_facts
from longctx.eval.mqar import mqar_sections
from longctx.eval.outputs import log_to_wandb, write_results
from longctx.eval.passkey import passkey_grid
from longctx.eval.perplexity import perplexity_by_context_length
from longctx.eval.prefix_ablation import prefix_ablation
from longctx.eval.scoring import Scorer
from longctx.eval.settings import EvalSettings, eval_settings, settings_dict
from longctx.eval.streaming import streaming_perplexity
from longctx.eval.token_bytes import byte_counter

log = logging.getLogger(__name__)


@contextmanager
def _timed(timings: dict, section: str):
    start = time.perf_counter()
    yield
    timings[section] = round(time.perf_counter() - start, 3)


def evaluate_model(model, datamodule, cfg, output_dir: Path, checkpoint: str | None = None) -> dict:
    """Every metric of `cfg.eval` on the test split;
    writes results.{json,csv}, section CSVs and PNGs."""
    settings = eval_settings(cfg.get("eval"))
    started = datetime.now(timezone.utc)
    scorer = Scorer(model.to(resolve_device(settings.device)).eval(), settings.autocast)
    if isinstance(datamodule, MQARDataModule):  # a recall probe, not a corpus: its own sections
        timings = {}
        with _timed(timings, "mqar"):
            sections = mqar_sections(scorer, datamodule, settings.batch_size)
        return _write(
            output_dir, sections, timings, cfg, datamodule, model, settings, checkpoint, started
        )
    tokenizer = datamodule.tokenizer
    count_bytes = byte_counter(tokenizer)
    stream = np.asarray(datamodule.split_tokens("test"), dtype=np.int64)
    tokens = torch.from_numpy(stream)
    train_length = int(cfg["context_length"])
    sections, timings = {}, {}

    with _timed(timings, "perplexity"):
        rows, positions = perplexity_by_context_length(
            scorer,
            tokens,
            settings.context_lengths,
            count_bytes,
            settings.max_tokens,
            settings.batch_size,
            settings.strides,
        )
    if settings.streaming.enabled is True or (
        settings.streaming.enabled == "auto" and scorer.backend.ordered_stream
    ):
        with _timed(timings, "streaming"):
            documents = datamodule.split_documents("test")
            offsets = np.concatenate(
                [[0], np.cumsum([len(d) + 1 for d in documents])]
            )  # + 1: each document's EOS
            row, sections["streaming_memory"] = streaming_perplexity(
                scorer,
                stream,
                offsets,
                settings.streaming.segment_length or train_length,
                settings.batch_size,
                settings.streaming.max_tokens,
                count_bytes,
            )
            rows.append(row)
    sections["perplexity"] = [row.as_dict() for row in rows]
    sections["position_loss"] = positions
    if settings.prefix_ablation.enabled:
        with _timed(timings, "prefix_ablation"):
            longest = settings.prefix_ablation.max_length or max(settings.context_lengths)
            sections["prefix_ablation"] = prefix_ablation(
                scorer, tokens, settings.prefix_ablation, longest, settings.batch_size
            )
    if settings.passkey.enabled:
        with _timed(timings, "passkey"):
            filler = stream[stream != tokenizer.eos_id]
            lengths = settings.passkey.lengths or settings.context_lengths
            sections["passkey"] = passkey_grid(
                scorer, filler, tokenizer, settings.passkey, lengths, settings.batch_size
            )
    facts = _planted_facts(datamodule) if settings.fact_recall.enabled else []
    if facts:
        with _timed(timings, "fact_recall"):
            lengths = settings.fact_recall.lengths or [train_length]
            buckets = datamodule.data_cfg.get("distances")  # the corpus's planted distances
            sections["fact_recall"] = fact_recall(
                scorer,
                facts,
                tokenizer,
                settings.fact_recall,
                lengths,
                settings.batch_size,
                sorted(buckets) if buckets else None,
            )

    return _write(
        output_dir, sections, timings, cfg, datamodule, model, settings, checkpoint, started
    )


def _write(output_dir, sections, timings, cfg, datamodule, model, settings, checkpoint, started):
    """results.json, CSVs, plots and wandb for the sections; returns what evaluate_model returns."""
    meta = _meta(cfg, datamodule, model, settings, checkpoint, started, timings)
    paths = write_results(Path(output_dir), meta, sections)
    log_to_wandb(sections, paths)
    _log_summary(sections, timings)
    return {
        "meta": meta,
        "rows": sections.get("perplexity", []),
        "sections": sections,
        "paths": paths,
    }


def _planted_facts(datamodule) -> list:
    """Facts of the test documents, for corpora that plant them (data.source=synthetic)."""
    if datamodule.data_cfg.get("source") != "synthetic":
        return []
    from longctx.data.corpus import load_corpus

    return planted_facts(load_corpus(datamodule.data_cfg)["test"])


def _meta(cfg, datamodule, model, settings: EvalSettings, checkpoint, started, timings) -> dict:
    trainer = cfg.get("trainer") or {}
    return {
        "attention": cfg["attention"]["name"],
        "attention_options": _plain(cfg["attention"]),
        "model": _plain(cfg["model"]),
        "parameters": sum(p.numel() for p in model.parameters()),
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
        **_corpus_meta(datamodule),
        "checkpoint": checkpoint,
        "eval_settings": settings_dict(settings),
        "eval_seconds": timings,
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "code_version": _code_version(),
    }


def _corpus_meta(datamodule) -> dict:
    if isinstance(datamodule, MQARDataModule):  # token ids generated directly: no tokenizer
        return {"tokenizer": "none"}
    return {
        "tokenizer": datamodule.tokenizer.name,
        "test_tokens": int(len(datamodule.split_tokens("test"))),
        "test_utf8_bytes": int(datamodule.split_utf8_bytes("test")),
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
            "ctx %5d %-9s ppl %s bpb %s %s",
            row["context_length"],
            row["protocol"],
            _fmt(row["ppl"]),
            _fmt(row["bpb"]),
            row["skipped"] or "",
        )
    for row in sections.get("prefix_ablation", []):
        log.info(
            "prefix %5d loss %s %s", row["prefix_length"], _fmt(row["loss"]), row["skipped"] or ""
        )
    passkey = [r for r in sections.get("passkey", []) if r["accuracy"] is not None]
    if passkey:
        log.info(
            "passkey accuracy %.3f over %d cells",
            np.mean([r["accuracy"] for r in passkey]),
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
            "fact recall ctx %d distance %s accuracy %s",
            row["context_length"],
            row["distance"],
            _fmt(row["accuracy"]),
        )
    log.info("evaluation seconds: %s", timings)


def evaluate_checkpoint(cfg: DictConfig) -> dict:
    """eval.py: rebuild the model and data of a checkpoint's run, then evaluate with `cfg.eval`."""
    eval_settings(cfg.eval)  # a bad setting fails here, before the checkpoint and data load
    model, saved_cfg = model_from_checkpoint(cfg.ckpt_path)
    run_cfg = OmegaConf.create(saved_cfg)
    run_cfg.eval = cfg.eval
    # Data and tokenizer must be the checkpoint's (the vocabulary depends on them); only where
    # caches live may differ between machines.
    run_cfg.data.cache_dir = cfg.paths.data_dir + "/cache"
    datamodule = build_datamodule(run_cfg, ordered_stream=False)
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
