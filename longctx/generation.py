"""Text from a checkpoint, piece by piece as it is sampled (generate.py)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from longctx.core.device import resolve_device
from longctx.errors import ConfigError
from longctx.pretrained import load_checkpoint

REPLACEMENT = "\ufffd"  # what a decoder gives for the first bytes of an unfinished character


def generate_text(settings: Mapping[str, Any]) -> Iterator[str]:
    """The prompt, then the sampled continuation in pieces as they are drawn.

    settings: ckpt_path, prompt, max_new_tokens, temperature, top_k, seed, device
    (conf/generate.yaml). The prompt follows an end-of-document token, as every document in
    training does.
    """
    max_new_tokens = int(settings["max_new_tokens"])
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens} must be at least 1")
    model, tokenizer, _ = load_checkpoint(settings["ckpt_path"])
    if tokenizer is None:
        raise ConfigError(
            f"ckpt_path={settings['ckpt_path']} was trained on generated token ids (data=mqar), "
            "which have no text to generate"
        )
    prompt_ids = [tokenizer.eos_id, *tokenizer.encode(str(settings["prompt"]))]
    total = len(prompt_ids) + max_new_tokens
    model.backend.check_sequence_length(total)
    if model.dims.position == "learned" and total > model.dims.context_length:
        raise ConfigError(
            f"the model's learned positions cover {model.dims.context_length} tokens, but the "
            f"prompt ({len(prompt_ids)} tokens) and max_new_tokens={max_new_tokens} need {total}; "
            "lower max_new_tokens or shorten the prompt"
        )
    device = resolve_device(str(settings.get("device", "auto")))
    model.to(device)
    torch.manual_seed(int(settings["seed"]))
    yield str(settings["prompt"])
    top_k = settings.get("top_k")
    generated: list[int] = []
    shown = ""
    tokens = model.stream(
        torch.tensor([prompt_ids], device=device),
        max_new_tokens,
        temperature=float(settings["temperature"]),
        top_k=None if top_k is None else int(top_k),
    )
    for token in tokens:
        generated.append(int(token))
        text = tokenizer.decode(generated)
        if text.endswith(REPLACEMENT):  # wait for the rest of a multi-byte character
            continue
        yield text[len(shown) :]
        shown = text
    text = tokenizer.decode(generated)
    if len(text) > len(shown):
        yield text[len(shown) :]
