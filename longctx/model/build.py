"""`build_model(cfg, vocab_size)`: the composed root config to a LanguageModel."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from longctx.attention import Backend, Mixer, ModelSettings, build_backend
from longctx.core.positions import POSITION_SCHEMES
from longctx.errors import ConfigError
from longctx.model.checkpointing import NONE
from longctx.model.layers import MLPS, NORMS
from longctx.model.lm import BUILD_KEYS, Block, LanguageModel, init_block_weights


def _choice(value: str, options, key: str) -> None:
    if value not in options:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of {sorted(options)}")


def model_dims(cfg: Mapping) -> ModelSettings:
    """The model-level settings a backend needs, validated."""
    model = cfg["model"]
    _choice(model["position"], POSITION_SCHEMES, "model.position")
    if model["d_model"] % model["n_head"]:
        raise ConfigError(
            f"model.d_model={model['d_model']} must be divisible by model.n_head={model['n_head']}"
        )
    if cfg["context_length"] < 1:
        raise ConfigError(f"context_length must be positive, got {cfg['context_length']}")
    return ModelSettings(
        n_layer=int(model["n_layer"]),
        n_head=int(model["n_head"]),
        d_model=int(model["d_model"]),
        context_length=int(cfg["context_length"]),
        position=model["position"],
        rope_base=float(model.get("rope_base", 10000.0)),
        bias=bool(model.get("bias", False)),
        dropout=float(model.get("dropout", 0.0)),
    )


def _parts(cfg: Mapping) -> tuple[ModelSettings, Backend, Callable[[], Mixer], type[nn.Module]]:
    """dims, backend, the default feed-forward factory and the norm class, validated."""
    model = cfg["model"]
    dims = model_dims(cfg)
    _choice(model.get("mlp", "gelu"), MLPS, "model.mlp")
    _choice(model.get("norm", "layernorm"), NORMS, "model.norm")
    backend = build_backend(cfg["attention"], dims)
    hidden = int(model.get("mlp_hidden") or 4 * dims.d_model)
    make_ffn = partial(
        MLPS[model.get("mlp", "gelu")], dims.d_model, hidden, dims.bias, dims.dropout
    )
    return dims, backend, make_ffn, NORMS[model.get("norm", "layernorm")]


def build_model(cfg: Mapping, vocab_size: int) -> LanguageModel:
    """Build the LM described by the composed root config (conf/train.yaml plus overrides)."""
    model = cfg["model"]
    dims, backend, make_ffn, norm = _parts(cfg)
    lm = LanguageModel(
        dims,
        backend,
        vocab_size,
        make_ffn=make_ffn,
        norm=norm,
        tie_embeddings=bool(model.get("tie_embeddings", True)),
        activation_checkpointing=model.get("activation_checkpointing", NONE),
    )
    # What LanguageModel.save_pretrained writes, so that from_pretrained rebuilds this model.
    lm.build_config = {"vocab_size": vocab_size, **{key: _plain(cfg[key]) for key in BUILD_KEYS}}
    return lm


def _plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return copy.deepcopy(value)


def build_block(cfg: Mapping, layer: int) -> Block:
    """Block `layer` of the model `build_model(cfg, ...)` builds, alone and initialised alike:
    for measuring one block of a model too large to build whole."""
    dims, backend, make_ffn, norm = _parts(cfg)
    if not 0 <= layer < dims.n_layer:
        raise ConfigError(f"layer {layer} does not exist in a model of {dims.n_layer} layers")
    block = Block(
        backend.mixer(layer), backend.ffn(layer) or make_ffn(), norm, dims.d_model, dims.dropout
    )
    init_block_weights(block, dims.n_layer)
    return block
