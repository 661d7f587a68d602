"""The decoder-only language model: embeddings, pre-norm blocks, head, streaming and generation.

The attention backend supplies each block's token mixer (and may replace its MLP); the model
never branches on which backend it is.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from longctx.attention.base import Backend, Mixer, ModelSettings, State
from longctx.core.files import atomic_write_bytes, atomic_write_text
from longctx.core.state import map_state, reset_rows
from longctx.errors import ConfigError
from longctx.model.checkpointing import NONE, checkpointed_blocks
from longctx.model.loss import chunked_cross_entropy

# The files of a directory written by LanguageModel.save_pretrained (Hugging Face's names).
PRETRAINED_CONFIG = "config.json"
PRETRAINED_WEIGHTS = "model.safetensors"
PRETRAINED_MODEL_TYPE = "longctx"
PRETRAINED_FORMAT_VERSION = 1
# The config sections build_model reads: what config.json keeps to rebuild the model.
BUILD_KEYS = ("attention", "model", "context_length")


def pretrained_config(directory: str | os.PathLike) -> dict[str, Any]:
    """config.json of a save_pretrained directory, checked to be longctx's."""
    path = Path(directory) / PRETRAINED_CONFIG
    if not path.is_file() or not (Path(directory) / PRETRAINED_WEIGHTS).is_file():
        raise ConfigError(
            f"{directory} is not a longctx model directory: it needs {PRETRAINED_CONFIG} and "
            f"{PRETRAINED_WEIGHTS}, as LanguageModel.save_pretrained writes them"
        )
    config = json.loads(path.read_text())
    if config.get("model_type") != PRETRAINED_MODEL_TYPE:
        raise ConfigError(
            f"{path} has model_type={config.get('model_type')!r}, not {PRETRAINED_MODEL_TYPE!r}: "
            "longctx reads only the directories it wrote (it does not load transformers models)"
        )
    if config.get("format_version", 1) > PRETRAINED_FORMAT_VERSION:
        raise ConfigError(
            f"{path} has format_version {config['format_version']}, newer than the "
            f"{PRETRAINED_FORMAT_VERSION} this code reads; update longctx to load it"
        )
    return config


class Block(nn.Module):
    """x + mixer(norm(x)), then x + ffn(norm(x)).

    Both forms run through `forward`, so that wrappers which act on a module's forward (FSDP's
    parameter gathering, activation checkpointing, hooks) see streaming as well:
    `block(x)` for a whole sequence from a fresh state, `block(x, state, start)` to stream.
    """

    def __init__(
        self, mixer: Mixer, ffn: Mixer, norm: type[nn.Module], d_model: int, dropout: float
    ):
        super().__init__()
        self.norm_mixer = norm(d_model)
        self.mixer = mixer
        self.norm_ffn = norm(d_model)
        self.ffn = ffn
        self.dropout = nn.Dropout(dropout)
        # Keep only the inputs for the backward pass and recompute the rest (checkpointing.py).
        self.checkpointed = False

    def forward(
        self,
        x: Tensor,
        state: State | None = None,
        start: int | None = None,
        reset: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, State]:
        """Without `start`: the block over a whole sequence from a fresh state.

        With `start`: streaming from `state` (None: a fresh one) at position `start`, returning
        (x, state). `reset` (bool [B]) marks rows that start a new document: their state is
        replaced by a fresh one first (core.state.reset_rows). Fresh states are made here, while
        a sharding wrapper has this block's parameters gathered.
        """
        if start is None:
            return self._run(self.sequence, x)
        if state is None:
            state = self.init_state(x.shape[0])
        elif reset is not None:
            state = reset_rows(state, self.init_state(x.shape[0]), reset)
        return self._run(self.step, x, state, start)

    def _run(self, fn, *args):
        if self.checkpointed and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def sequence(self, x: Tensor) -> Tensor:
        x = x + self.dropout(self.mixer(self.norm_mixer(x)))
        return x + self.ffn(self.norm_ffn(x))

    def init_state(self, batch_size: int) -> State:
        return (self.mixer.init_state(batch_size), self.ffn.init_state(batch_size))

    def step(self, x: Tensor, state: State, start: int) -> tuple[Tensor, State]:
        mixer_state, ffn_state = state
        y, mixer_state = self.mixer.step(self.norm_mixer(x), mixer_state, start)
        x = x + y
        y, ffn_state = self.ffn.step(self.norm_ffn(x), ffn_state, start)
        return x + y, (mixer_state, ffn_state)


def carry_over(state: State) -> State:
    """A streaming state to carry into the next batch: detached (gradients stop at the batch
    boundary) and copied into storage of its own size. A state cut from a batch's tensors (the
    last positions of a block's input, an empty slice of it) is a view that would keep the
    whole tensor, a batch's activations, alive through the next step."""
    return map_state(lambda tensor: tensor.detach().clone(), state)


def _normal_init(modules) -> None:
    """GPT-2's initialisation: weights normal with std 0.02, biases zero."""
    for module in modules:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


def init_block_weights(block: Block, n_layer: int) -> None:
    """A block initialised alone as the language model initialises its blocks."""
    _normal_init(block.modules())
    block.mixer.init_weights(n_layer)
    block.ffn.init_weights(n_layer)


class LanguageModel(nn.Module):
    def __init__(
        self,
        dims: ModelSettings,
        backend: Backend,
        vocab_size: int,
        make_ffn,
        norm: type[nn.Module],
        tie_embeddings: bool = True,
        activation_checkpointing: str = NONE,
    ):
        super().__init__()
        self.dims = dims
        self.backend = backend
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, dims.d_model)
        self.pos_embed = (
            nn.Embedding(dims.context_length, dims.d_model) if dims.position == "learned" else None
        )
        self.dropout = nn.Dropout(dims.dropout)
        self.blocks = nn.ModuleList(
            Block(backend.mixer(i), backend.ffn(i) or make_ffn(), norm, dims.d_model, dims.dropout)
            for i in range(dims.n_layer)
        )
        self.norm = norm(dims.d_model)
        self.head = nn.Linear(dims.d_model, vocab_size, bias=False)
        if tie_embeddings:
            self.head.weight = self.embed.weight
        self._init_weights()
        self.activation_checkpointing = activation_checkpointing
        self.build_config: dict[str, Any] | None = None  # set by build_model

    def _init_weights(self) -> None:
        _normal_init(self.modules())
        for block in self.blocks:
            block.mixer.init_weights(self.dims.n_layer)
            block.ffn.init_weights(self.dims.n_layer)

    @property
    def activation_checkpointing(self) -> str:
        """`none`, `blocks` or `every_<k>` (longctx.model.checkpointing); settable at any time."""
        return self._activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, setting: str) -> None:
        chosen = checkpointed_blocks(setting, len(self.blocks))
        for index, block in enumerate(self.blocks):
            block.checkpointed = index in chosen
        self._activation_checkpointing = setting

    def _embed(self, input_ids: Tensor, start: int) -> Tensor:
        x = self.embed(input_ids)
        if self.pos_embed is not None:
            end = start + input_ids.shape[1]
            if end > self.dims.context_length:
                raise ValueError(
                    f"learned positions cover {self.dims.context_length} tokens "
                    f"but position {end - 1} was requested; "
                    "use model.position=rope/alibi/none to go past the training length"
                )
            x = x + self.pos_embed(torch.arange(start, end, device=input_ids.device))
        return self.dropout(x)

    def forward(
        self,
        input_ids: Tensor,
        state: State | None = None,
        targets: Tensor | None = None,
        reset: Tensor | None = None,
        accuracy: bool = False,
    ) -> Tensor | tuple:
        """Logits [B, N, V] for positions 0..N-1 with fresh state.

        With `state` (or `reset`): streaming, as `step`, returning (output, state); `reset`
        (bool [B]) restarts the flagged rows from a fresh state (a new document), and without
        `state` every row starts fresh. With `targets` [B, N] the output is the mean next-token
        loss instead of the logits, computed in chunks (loss.py); with `accuracy` too, the pair
        (loss, greedy accuracy over the scored targets). Streaming goes through here
        rather than through a separate method so that FSDP's hooks gather the parameters of
        every block in either form.
        """
        streaming = state is not None or reset is not None
        if reset is not None:
            restart = reset.cpu()  # one host sync per call, not one per block
            if bool(restart.all()):
                state, reset = None, None  # every row starts afresh: positions restart at 0
            elif not bool(restart.any()):
                reset = None
        start = int(state["position"]) if state is not None else 0
        self.backend.check_sequence_length(start + input_ids.shape[1])
        x = self._embed(input_ids, start)
        if not streaming:
            for block in self.blocks:  # outside the blocks, which `compile: true` compiles
                block.mixer.prepare(input_ids.shape[1], input_ids.device)
            for block in self.blocks:
                x = block(x)
        else:
            layer_states = state["layers"] if state is not None else [None] * len(self.blocks)
            new_layer_states = []
            for block, block_state in zip(self.blocks, layer_states):
                x, block_state = block(x, block_state, start, reset)
                new_layer_states.append(block_state)
        x = self.norm(x)
        if targets is None:
            output = self.head(x)
        else:
            output = chunked_cross_entropy(x, self.head, targets, with_accuracy=accuracy)
        if not streaming:
            return output
        position = torch.full((), start + input_ids.shape[1], device=input_ids.device)
        return output, {"position": position, "layers": new_layer_states}

    def init_state(self, batch_size: int) -> State:
        position = torch.zeros((), dtype=torch.long, device=self.embed.weight.device)
        return {
            "position": position,
            "layers": [block.init_state(batch_size) for block in self.blocks],
        }

    def step(self, input_ids: Tensor, state: State) -> tuple[Tensor, State]:
        """Continue from `state` with the next n tokens; chunked steps equal one `forward`."""
        return self(input_ids, state)

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
    ) -> Tensor:
        """Sample continuations with the streaming state:
        one prompt pass, then one token per step."""
        generated = [input_ids, *self.stream(input_ids, max_new_tokens, temperature, top_k)]
        return torch.cat(generated, dim=1)

    @torch.no_grad()
    def stream(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
    ) -> Iterator[Tensor]:
        """`generate`, one sampled token [B, 1] at a time as it is drawn (for printing as it
        goes); temperature <= 0 picks the most likely token."""
        state = self.init_state(input_ids.shape[0])
        logits, state = self.step(input_ids, state)
        for index in range(max_new_tokens):
            next_logits = logits[:, -1, :]
            if temperature <= 0:
                next_token = next_logits.argmax(dim=-1, keepdim=True)
            else:
                next_logits = next_logits / temperature
                if top_k is not None:
                    kth = torch.topk(next_logits, min(top_k, next_logits.shape[-1])).values[:, -1:]
                    next_logits = next_logits.masked_fill(next_logits < kth, float("-inf"))
                next_token = torch.multinomial(F.softmax(next_logits, dim=-1), num_samples=1)
            yield next_token
            if index + 1 < max_new_tokens:
                logits, state = self.step(next_token, state)

    def save_pretrained(self, directory: str | os.PathLike, run_config: Mapping | None = None):
        """Write `model.safetensors` (the weights, no pickle) and `config.json` (what rebuilds
        the model: vocab size and the attention, model and context_length settings; with
        `run_config`, the whole run's config too) into `directory`, in the layout of Hugging
        Face's `save_pretrained`. `from_pretrained` loads it back. Needs a model made by
        `build_model`, which records those settings."""
        if self.build_config is None:
            raise ValueError("save_pretrained needs a model built by longctx.build_model")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {
            "model_type": PRETRAINED_MODEL_TYPE,
            "format_version": PRETRAINED_FORMAT_VERSION,
            **self.build_config,
            "run_config": dict(run_config) if run_config is not None else None,
        }
        atomic_write_text(directory / PRETRAINED_CONFIG, json.dumps(config, indent=2) + "\n")
        # save_model writes tied weights (embedding and head) once; load_model ties them back.
        # Written aside first, then moved in whole with the mode a plain open gives.
        with tempfile.TemporaryDirectory() as scratch:
            staged = Path(scratch) / PRETRAINED_WEIGHTS
            safetensors.torch.save_model(self, str(staged), {"format": "pt"})
            atomic_write_bytes(directory / PRETRAINED_WEIGHTS, staged.read_bytes())

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> LanguageModel:
        """The model `save_pretrained` wrote into `directory` (fp32 or as saved, on the CPU)."""
        from longctx.model.build import build_model  # build imports this module

        config = pretrained_config(directory)
        settings = {key: config[key] for key in BUILD_KEYS}
        model = build_model(settings, int(config["vocab_size"]))
        safetensors.torch.load_model(model, str(Path(directory) / PRETRAINED_WEIGHTS))
        return model

    def compile_blocks(self) -> None:
        """`compile: true`: torch.compile each block in place (regional compilation).

        Blocks are the unit because they repeat: identical blocks share one compiled graph, so
        compilation costs one block, not the whole depth, and the attention kernel (FlexAttention
        included) is traced into its block's region. Parameter names do not change, so
        checkpoints load either way. What is compiled is the whole-sequence form
        (`Block.sequence`); streaming stays eager, and activation checkpointing wraps the
        compiled region.
        """
        for block in self.blocks:
            block.sequence = torch.compile(block.sequence)

    def num_parameters(self, exclude_embeddings: bool = True) -> int:
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings and self.pos_embed is not None:
            total -= self.pos_embed.weight.numel()
        return total
