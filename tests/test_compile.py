"""`compile: true`: each block is compiled on its own (regional compilation), FlexAttention inside
the compiled region, and the compiled model computes what the eager one does.

The softmax backends run their GPU kernel here (Flex forced through the seam where they have
one, the torch kernel otherwise): dynamo must trace each block in one graph (checked with
torch._dynamo.explain, which traces without compiling), and inductor's CPU code must give the
eager logits within 1e-5 (fp32; inductor reorders sums).
"""

from __future__ import annotations

import pytest
import torch
from backend_cases import CASES
from conftest import model_config
from omegaconf import OmegaConf

from longctx import build_model
from longctx.attention import backend_class
from longctx.ops.seam import FLEX
from longctx.train.module import LanguageModelTask

VOCAB = 37
SOFTMAX = [
    "full",
    "sliding_window",
    "local",
    "dilated",
    "longformer",
    "sparse_strided",
    "sparse_fixed",
    "blockwise",
    "moba",
    "memory_compressed",
    "transformer_xl",
]
# Compiling a model with inductor takes about a minute per backend on a CPU: the default test
# set compiles three (SDPA's kernel; Flex with cached BlockMasks; Flex with a BlockMask built in
# the compiled region from moba's gate), the slow set every softmax backend.
COMPILED_FAST = ["full", "sliding_window", "moba"]


def _gpu_kernel_config(name: str, *overrides: str):
    """The backend's GPU kernel: Flex where it has one (except full, whose GPU kernel without
    ALiBi is SDPA), its torch kernel otherwise."""
    options = dict(CASES[name]["options"])
    if FLEX in backend_class(name).kernels and name != "full":  # full's GPU kernel is SDPA
        options["kernel"] = FLEX
    return model_config(name, options, *overrides)


def _ids(n: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", SOFTMAX)
def test_no_graph_break_inside_a_block(name):
    torch.manual_seed(0)
    model = build_model(_gpu_kernel_config(name), VOCAB).eval()
    x = torch.randn(2, CASES[name]["seq_len"], model.dims.d_model)
    for layer, block in enumerate(model.blocks):
        torch._dynamo.reset()
        with torch.no_grad():
            explained = torch._dynamo.explain(block)(x)
        assert explained.graph_break_count == 0, (layer, explained.break_reasons)
        assert explained.graph_count == 1


def _task_config(cfg, compile: bool) -> dict:
    """What the LightningModule reads of a run's config (no run directory to resolve)."""
    keys = ("model", "attention", "context_length")
    return {**OmegaConf.to_container(OmegaConf.masked_copy(cfg, keys)), "compile": compile}


def _compiled_equals_eager(name: str, *overrides: str) -> None:
    cfg = _gpu_kernel_config(name, *overrides)
    torch.manual_seed(0)
    task = LanguageModelTask(_task_config(cfg, compile=True), VOCAB)
    eager = build_model(cfg, VOCAB)
    eager.load_state_dict(task.model.state_dict())
    task.configure_model()  # what Lightning calls before fit: compiles each block in place
    assert task.blocks_compiled
    assert list(task.model.state_dict()) == list(eager.state_dict())  # checkpoints unchanged
    ids = _ids(CASES[name]["seq_len"])
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(task.model.eval()(ids), eager.eval()(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", COMPILED_FAST)
def test_compiled_blocks_give_the_eager_logits(name):
    _compiled_equals_eager(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in SOFTMAX if n not in COMPILED_FAST])
def test_compiled_blocks_give_the_eager_logits_every_softmax_backend(name):
    _compiled_equals_eager(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["full", "longformer", "moba"])
def test_compiled_blocks_give_the_eager_logits_with_alibi(name):
    """ALiBi as Flex's score_mod inside the compiled region (full forced to Flex)."""
    _compiled_equals_eager(
        name, "model.position=alibi", *(["attention.kernel=flex"] * (name == "full"))
    )


def test_compile_false_leaves_the_model_eager():
    task = LanguageModelTask(_task_config(model_config("full"), compile=False), VOCAB)
    task.configure_model()
    assert not task.blocks_compiled
    assert all(block._compiled_call_impl is None for block in task.model.blocks)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["full", "sliding_window", "sparse_strided", "moba"])
def test_cuda_compiled_blocks_train_like_eager(name):
    """`compile: true` on a GPU: Flex's forward and backward inside the compiled blocks give the
    eager model's loss and gradients."""
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = _gpu_kernel_config(name)
    torch.manual_seed(0)
    compiled = LanguageModelTask(_task_config(cfg, compile=True), VOCAB).cuda()
    eager = build_model(cfg, VOCAB).cuda()
    eager.load_state_dict(compiled.model.state_dict())
    compiled.configure_model()
    ids = _ids(CASES[name]["seq_len"] + 1).cuda()
    grads = []
    for model in (compiled.model, eager):
        logits = model(ids[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        grads.append([p.grad for p in model.parameters()])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
