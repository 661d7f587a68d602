"""Next-token NLL of a batch, and the log-likelihood of continuations:
the primitives of every metric."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from longctx.errors import ConfigError


@dataclass
class Scorer:
    """A model in eval mode, where it runs, and how (fp32, or bf16 autocast).

    `forward_tokens` counts the input tokens of every forward call: the evaluation's work,
    recorded per section in results.json (a count, comparable across machines).
    """

    model: torch.nn.Module
    autocast: str | None = None
    forward_tokens: int = 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def backend(self):
        return self.model.backend

    def refusal(self, length: int) -> str | None:
        """Why the model cannot read `length` tokens (a backend's max_len, learned positions),
        or None."""
        try:
            self.backend.check_sequence_length(length)
        except ConfigError as err:
            return str(err)
        covered = self.model.dims.context_length
        if getattr(self.model, "pos_embed", None) is not None and length > covered:
            return f"learned positions cover {covered} tokens, fewer than {length}"
        return None

    def autocast_context(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    @torch.no_grad()
    def nll(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """NLL (nats, float64, on the CPU) of targets[b, t] given inputs[b, :t+1]:
        one forward call."""
        self.forward_tokens += inputs.numel()
        with self.autocast_context():
            logits = self.model(inputs.to(self.device))
        nll = F.cross_entropy(
            logits.float().transpose(1, 2), targets.to(self.device), reduction="none"
        )
        return nll.double().cpu()

    def continuation_logprobs(
        self, context: list[int], continuations: list[list[int]], batch_size: int
    ) -> list[float]:
        """log P(continuation | context) for each continuation, as lm-eval-harness scores choices:
        context and continuation encoded separately, one forward per (context + continuation).
        Shorter sequences are padded on the right; causal models never look at the padding.
        """
        if not context:
            raise ValueError("continuation scoring needs at least one context token")
        scores = []
        for first in range(0, len(continuations), batch_size):
            chunk = continuations[first : first + batch_size]
            length = len(context) + max(len(c) for c in chunk)
            rows = torch.zeros(len(chunk), length, dtype=torch.long)
            for row, continuation in zip(rows, chunk):
                sequence = context + continuation
                row[: len(sequence)] = torch.as_tensor(sequence)
            nll = self.nll(rows[:, :-1], rows[:, 1:])
            for row_nll, continuation in zip(nll, chunk):
                begin = (
                    len(context) - 1
                )  # the logits at the context's last token predict the first continuation token
                scores.append(-float(row_nll[begin : begin + len(continuation)].sum()))
        return scores


class Stopwatch:
    """Wall time and (on CUDA) peak allocated memory of a block of evaluation work."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = 0.0
        self.peak_memory_mib: float | None = None

    def __enter__(self) -> Stopwatch:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_memory_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        self.seconds = time.perf_counter() - self._start
