"""From a checkpoint to text and to a Hugging Face style folder: load_checkpoint, generate,
export and reload, with the tokenizer travelling inside the checkpoint."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SMALL_RUN, compose_config
from hydra.core.hydra_config import HydraConfig

import longctx
from longctx.checkpoints import TOKENIZER_KEY
from longctx.core.cli import errors_in_one_line
from longctx.data.tokenizer import ByteTokenizer, HFTokenizer
from longctx.errors import ConfigError
from longctx.eval.run import evaluate_checkpoint
from longctx.generation import generate_text
from longctx.jobs import train
from longctx.model import LanguageModel

PROMPT = "To be, or not"


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory) -> tuple[Path, str]:
    """A tiny run on a small BPE vocabulary, its data cache (tokenizer included) deleted after
    training; and the cached tokenizer's file as it was."""
    base = tmp_path_factory.mktemp("pretrained")
    out, cache = base / "run", base / "cache"
    cfg = compose_config(
        *SMALL_RUN,
        "tokenizer=bpe",
        "tokenizer.vocab_size=300",
        "tokenizer.max_train_bytes=100000",
        f"paths.root_dir={ROOT}",
        f"paths.output_dir={out}",
        f"data.cache_dir={cache}",
    )
    HydraConfig.instance().set_config(cfg)
    train(cfg)
    (trained_tokenizer,) = (cache / "tokenizers").glob("bpe-*.json")
    tokenizer_json = trained_tokenizer.read_text()
    shutil.rmtree(cache)
    return out / "checkpoints" / "last.ckpt", tokenizer_json


def test_the_tokenizer_travels_with_the_checkpoint(bpe_run):
    ckpt, tokenizer_json = bpe_run
    model, tokenizer, cfg = longctx.load_checkpoint(ckpt)
    assert isinstance(tokenizer, HFTokenizer) and tokenizer.name == "bpe"
    assert tokenizer.model.to_str() == tokenizer_json  # the very tokenizer the run trained with
    assert tokenizer.vocab_size == model.vocab_size == 300
    assert tokenizer.decode(tokenizer.encode(PROMPT)) == PROMPT
    assert cfg["tokenizer"]["name"] == "bpe" and cfg["model"]["d_model"] == 64
    assert not model.training


def test_a_checkpoint_without_its_tokenizer_says_what_is_missing(bpe_run, tmp_path):
    ckpt, _ = bpe_run
    contents = torch.load(ckpt, map_location="cpu", weights_only=True)
    del contents[TOKENIZER_KEY]
    older = tmp_path / "older.ckpt"
    torch.save(contents, older)
    with pytest.raises(ConfigError, match="written before checkpoints held their tokenizer"):
        longctx.load_checkpoint(older)


def test_eval_scores_with_the_checkpoints_tokenizer_and_never_rebuilds_one(
    bpe_run, tmp_path, monkeypatch
):
    """The run's data cache (its trained BPE file included) is gone: eval.py re-tokenises the
    test split with the tokenizer stored in the checkpoint, never training or loading another."""
    ckpt, _ = bpe_run

    def refuse(*args, **kwargs):
        raise AssertionError("eval.py built a tokenizer instead of using the checkpoint's")

    monkeypatch.setattr("longctx.data.datamodule.build_tokenizer", refuse)
    cfg = compose_config(
        f"ckpt_path={ckpt}",
        f"paths.root_dir={ROOT}",
        f"paths.output_dir={tmp_path / 'eval'}",
        f"paths.data_dir={tmp_path / 'data'}",
        "logger=csv",
        "eval.context_lengths=[32]",
        "eval.strides=[null]",
        "eval.max_tokens=256",
        "eval.prefix_ablation.enabled=false",
        "eval.passkey.enabled=false",
        "eval.fact_recall.enabled=false",
        config_name="eval",
    )
    HydraConfig.instance().set_config(cfg)
    evaluate_checkpoint(cfg)
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["tokenizer"] == "bpe" and results["vocab_size"] == 300
    assert results["perplexity"][0]["tokens"] > 0


def test_generate_streams_the_greedy_continuation(bpe_run):
    ckpt, _ = bpe_run
    settings = dict(
        ckpt_path=str(ckpt),
        prompt=PROMPT,
        max_new_tokens=12,
        temperature=0.0,
        top_k=None,
        seed=0,
        device="cpu",
    )
    pieces = list(generate_text(settings))
    model, tokenizer, _ = longctx.load_checkpoint(ckpt)
    prompt_ids = [tokenizer.eos_id, *tokenizer.encode(PROMPT)]
    expected = model.generate(torch.tensor([prompt_ids]), 12, temperature=0.0)
    assert pieces[0] == PROMPT and len(pieces) > 2  # the prompt, then piece by piece
    assert "".join(pieces[1:]) == tokenizer.decode(expected[0, len(prompt_ids) :].tolist())


def test_generate_py_prints_the_prompt_and_its_continuation(bpe_run):
    ckpt, _ = bpe_run
    command = [sys.executable, "generate.py", f"ckpt_path={ckpt}", "prompt=To be"]
    done = subprocess.run(
        [*command, "max_new_tokens=8"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("To be") and len(done.stdout) > len("To be\n")


def test_a_generate_mistake_is_one_line_and_status_1(bpe_run, capsys):
    ckpt, _ = bpe_run
    settings = dict(ckpt_path=str(ckpt), prompt="", max_new_tokens=0, temperature=1.0, seed=0)
    with pytest.raises(SystemExit) as stopped, errors_in_one_line():
        list(generate_text(settings))
    assert stopped.value.code == 1
    assert capsys.readouterr().err == "error: max_new_tokens=0 must be at least 1\n"


def test_export_then_reload_gives_equal_logits(bpe_run, tmp_path):
    ckpt, _ = bpe_run
    exported = longctx.export_checkpoint(ckpt, tmp_path / "exported")
    files = {path.name for path in exported.iterdir()}
    assert files == {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    model, tokenizer, cfg = longctx.load_checkpoint(ckpt)
    again, tokenizer_again, cfg_again = longctx.load_checkpoint(exported)
    ids = torch.tensor([tokenizer.encode("Now is the winter of our discontent")])
    with torch.no_grad():
        assert torch.equal(model(ids), again(ids))
    assert again.head.weight is again.embed.weight  # tied as trained
    assert tokenizer_again.to_state() == tokenizer.to_state() and cfg_again == cfg
    assert HFTokenizer.from_pretrained(exported).to_state() == tokenizer.to_state()
    assert torch.equal(LanguageModel.from_pretrained(exported).head.weight, model.head.weight)
    with pytest.raises(ConfigError, match="already exists and is not empty"):
        longctx.export_checkpoint(ckpt, exported)


def test_only_longctx_model_folders_are_read(bpe_run, tmp_path):
    ckpt, _ = bpe_run
    exported = longctx.export_checkpoint(ckpt, tmp_path / "exported")
    config = json.loads((exported / "config.json").read_text())
    (exported / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ConfigError, match="does not load transformers models"):
        longctx.load_checkpoint(exported)


def test_a_built_model_and_the_byte_tokenizer_round_trip_through_a_folder(tmp_path):
    cfg = compose_config("model=tiny", "attention=sliding_window", "attention.window=8")
    model = longctx.build_model(cfg, ByteTokenizer.vocab_size).eval()
    model.save_pretrained(tmp_path / "m")
    ByteTokenizer().save_pretrained(tmp_path / "m")
    again, tokenizer, settings = longctx.load_checkpoint(tmp_path / "m")
    ids = torch.randint(0, ByteTokenizer.vocab_size, (2, 24))
    with torch.no_grad():
        assert torch.equal(model(ids), again(ids))
    assert isinstance(tokenizer, ByteTokenizer)
    assert ByteTokenizer.from_pretrained(tmp_path / "m").to_state() == {"kind": "byte"}
    assert settings["attention"]["window"] == 8 and settings["model"] == model.build_config["model"]
    with pytest.raises(ConfigError, match="not a HFTokenizer"):
        HFTokenizer.from_pretrained(tmp_path / "m")
