"""The decoder-only language model: embeddings, pre-norm blocks, head, streaming and generation.

The attention backend supplies each block's token mixer (and may replace its MLP); the model
never branches on which backend it is.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from longctx.attention.base import Backend, Mixer, ModelSettings, State


class Block(nn.Module):
    """x + mixer(norm(x)), then x + ffn(norm(x))."""

    def __init__(
        self, mixer: Mixer, ffn: Mixer, norm: type[nn.Module], d_model: int, dropout: float
    ):
        super().__init__()
        self.norm_mixer = norm(d_model)
        self.mixer = mixer
        self.norm_ffn = norm(d_model)
        self.ffn = ffn
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
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


class LanguageModel(nn.Module):
    def __init__(
        self,
        dims: ModelSettings,
        backend: Backend,
        vocab_size: int,
        make_ffn,
        norm: type[nn.Module],
        tie_embeddings: bool = True,
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

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for block in self.blocks:
            block.mixer.init_weights(self.dims.n_layer)
            block.ffn.init_weights(self.dims.n_layer)

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

    def forward(self, input_ids: Tensor) -> Tensor:
        """Logits [B, N, V] for positions 0..N-1 with fresh state."""
        self.backend.check_sequence_length(input_ids.shape[1])
        for block in self.blocks:  # outside the blocks, which `compile: true` compiles
            block.mixer.prepare(input_ids.shape[1], input_ids.device)
        x = self._embed(input_ids, 0)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def init_state(self, batch_size: int) -> State:
        position = torch.zeros((), dtype=torch.long, device=self.embed.weight.device)
        return {
            "position": position,
            "layers": [block.init_state(batch_size) for block in self.blocks],
        }

    def step(self, input_ids: Tensor, state: State) -> tuple[Tensor, State]:
        """Continue from `state` with the next n tokens; chunked steps equal one `forward`."""
        start = int(state["position"])
        self.backend.check_sequence_length(start + input_ids.shape[1])
        x = self._embed(input_ids, start)
        layer_states = []
        for block, block_state in zip(self.blocks, state["layers"]):
            x, block_state = block.step(x, block_state, start)
            layer_states.append(block_state)
        logits = self.head(self.norm(x))
        return logits, {"position": state["position"] + input_ids.shape[1], "layers": layer_states}

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
        state = self.init_state(input_ids.shape[0])
        logits, state = self.step(input_ids, state)
        generated = [input_ids]
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
            generated.append(next_token)
            if index + 1 < max_new_tokens:
                logits, state = self.step(next_token, state)
        return torch.cat(generated, dim=1)

    def compile_blocks(self) -> None:
        """`compile: true`: torch.compile each block in place (regional compilation).

        Blocks are the unit because they repeat: identical blocks share one compiled graph, so
        compilation costs one block, not the whole depth, and the attention kernel (FlexAttention
        included) is traced into its block's region. Parameter names do not change, so
        checkpoints load either way. Streaming (`step`) stays eager.
        """
        for block in self.blocks:
            block.compile()

    def num_parameters(self, exclude_embeddings: bool = True) -> int:
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings and self.pos_embed is not None:
            total -= self.pos_embed.weight.numel()
        return total
