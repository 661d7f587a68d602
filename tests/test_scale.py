"""Activation checkpointing and the chunked loss are exact: same outputs, same gradients."""

from __future__ import annotations

import pytest
import torch
from backend_cases import CASES
from conftest import model_config
from torch.nn import functional as F

from longctx import build_model
from longctx.core.state import map_state
from longctx.errors import ConfigError
from longctx.model.checkpointing import checkpointed_blocks
from longctx.model.loss import chunked_cross_entropy

VOCAB = 37
NAMES = sorted(CASES)


def build(name: str, *overrides: str, seed: int = 0):
    case = CASES[name]
    cfg = model_config(name, case["options"], *case.get("model", ()), *overrides)
    cfg.context_length = max(cfg.context_length, 2 * case["seq_len"])
    torch.manual_seed(seed)
    return build_model(cfg, VOCAB)


def ids_and_targets(n: int, batch: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, VOCAB, (batch, n + 1), generator=torch.Generator().manual_seed(seed))
    return tokens[:, :-1], tokens[:, 1:]


def run_and_grads(model, fn, rng_seed: int = 5):
    """fn(model) -> (loss, outputs to compare); the outputs, then every parameter's gradient."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(rng_seed)  # the same dropout masks for both settings
    loss, outputs = fn(model)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return outputs, grads


def assert_identical(a, b):
    """Bit for bit: the same tensors, nested the same way."""
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b), (a - b).abs().max()
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_identical(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_identical(x, y)
    else:
        assert a == b


def whole_sequence(model, n: int):
    ids, targets = ids_and_targets(n)
    logits = model(ids)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten()), logits


def two_streamed_batches(model, n: int):
    """As an ordered-stream training step does: a batch from fresh state, then the next batch
    continuing it with one row restarting (a new document), both in one graph. Halves of the
    case's length: transformer_xl's state then holds part of a segment."""
    first, first_targets = ids_and_targets(n // 2, seed=1)
    second, second_targets = ids_and_targets(n // 2, seed=2)
    loss_a, state = model(first, targets=first_targets, reset=torch.ones(2, dtype=torch.bool))
    loss_b, state = model(second, state, targets=second_targets, reset=torch.tensor([True, False]))
    return loss_a + loss_b, (loss_a, loss_b, state)


@pytest.mark.parametrize(
    "name, setting",
    [(name, "blocks") for name in NAMES]
    + [(name, "every_2") for name in ("full", "transformer_xl", "hybrid")],
)
def test_checkpointing_is_exact_on_whole_sequences(name, setting):
    model = build(name)
    n = CASES[name]["seq_len"]
    plain = run_and_grads(model, lambda m: whole_sequence(m, n))
    model.activation_checkpointing = setting
    assert any(block.checkpointed for block in model.blocks)
    assert_identical(run_and_grads(model, lambda m: whole_sequence(m, n)), plain)


@pytest.mark.parametrize("name", NAMES)
def test_checkpointing_is_exact_on_streams_with_carried_state(name):
    model = build(name)
    n = CASES[name]["seq_len"]
    plain = run_and_grads(model, lambda m: two_streamed_batches(m, n))
    model.activation_checkpointing = "blocks"
    assert_identical(run_and_grads(model, lambda m: two_streamed_batches(m, n)), plain)


@pytest.mark.parametrize("name", ["full", "transformer_xl", "rwkv", "hybrid"])
def test_checkpointing_replays_dropout(name):
    """With dropout the recomputation must draw the masks of the first forward."""
    model = build(name, "model.dropout=0.2").train()
    n = CASES[name]["seq_len"]
    plain = run_and_grads(model, lambda m: two_streamed_batches(m, n))
    model.activation_checkpointing = "blocks"
    assert_identical(run_and_grads(model, lambda m: two_streamed_batches(m, n)), plain)
    other_masks = run_and_grads(model, lambda m: two_streamed_batches(m, n), rng_seed=6)
    assert not torch.equal(other_masks[0][0], plain[0][0])  # dropout is really active


def test_checkpointed_model_keeps_zero_gradient_to_the_future():
    model = build("transformer_xl", "model.activation_checkpointing=blocks")
    n = CASES["transformer_xl"]["seq_len"]
    captured = {}

    def keep_embeddings(module, inputs, output):
        output.retain_grad()
        captured["x"] = output

    model.embed.register_forward_hook(keep_embeddings)
    model(ids_and_targets(n)[0])[:, n // 2].sum().backward()
    grad = captured["x"].grad
    assert grad[:, n // 2 + 1 :].abs().max() == 0 and grad[:, : n // 2 + 1].abs().sum() > 0


def test_checkpointing_saves_only_block_inputs():
    """What autograd keeps shrinks to each block's input when every block is checkpointed."""

    def saved_bytes(model) -> int:
        storages = {}

        def pack(tensor):
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model.blocks[0](torch.randn(2, 64, 64, requires_grad=True))
        return sum(storages.values())

    model = build("full")
    plain = saved_bytes(model)
    model.activation_checkpointing = "blocks"
    assert saved_bytes(model) == 2 * 64 * 64 * 4 < plain / 4


def test_the_carried_state_owns_storage_of_its_own_size():
    """A view of the batch's block inputs would keep them alive through the next step."""
    from longctx.model.lm import carry_over

    model = build("transformer_xl")
    ids, targets = ids_and_targets(20)  # 2 segments of 8 and a partial one
    _, state = model(ids, targets=targets, reset=torch.ones(2, dtype=torch.bool))
    tensors = []
    map_state(tensors.append, state["layers"])
    assert any(t.untyped_storage().nbytes() > t.nbytes for t in tensors)  # views, as computed
    carried = []
    map_state(carried.append, carry_over(state)["layers"])
    assert all(t.untyped_storage().nbytes() == t.nbytes and not t.requires_grad for t in carried)
    assert_identical(carried, [t.detach() for t in tensors])


def test_checkpointing_settings():
    assert checkpointed_blocks("none", 4) == frozenset()
    assert checkpointed_blocks("blocks", 4) == {0, 1, 2, 3}
    assert checkpointed_blocks("every_3", 7) == {0, 3, 6}
    for bad in ("all", "every_0", "every_x", "every_-1"):
        with pytest.raises(ConfigError, match="activation_checkpointing"):
            checkpointed_blocks(bad, 4)


def test_a_bad_checkpointing_setting_is_refused_before_any_data():
    from longctx.train.run import validate_config

    with pytest.raises(ConfigError, match="activation_checkpointing='sometimes'.*every_<k>"):
        validate_config(model_config("full", {}, "model.activation_checkpointing=sometimes"))


# --- the chunked loss -------------------------------------------------------------------------


def plain_loss(hidden, head, targets):
    """The loss the training step computed before: every position's logits at once."""
    logits = head(hidden).flatten(0, 1)
    return F.cross_entropy(
        logits.to(torch.promote_types(logits.dtype, torch.float32)), targets.flatten()
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunked_loss_equals_the_plain_loss_and_its_gradients(dtype):
    generator = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 11, bias=False).to(dtype)
    hidden = torch.randn(3, 29, 16, generator=generator, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, 11, (3, 29), generator=generator)
    results = []
    for loss_fn in (plain_loss, lambda h, w, t: chunked_cross_entropy(h, w, t, 11 * 10)):
        head.zero_grad()
        hidden.grad = None
        loss = loss_fn(hidden, head, targets)
        loss.backward()
        results.append((loss.detach(), hidden.grad.clone(), head.weight.grad.clone()))
    # 87 positions in chunks of 10 rows: 9 chunks, the last one partial. The chunk sums add up
    # in another order than the plain mean's single reduction: rounding of the sum only.
    tolerance = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {}
    for chunked, plain in zip(results[1], results[0]):
        torch.testing.assert_close(chunked, plain, **tolerance)


def test_chunked_loss_without_gradients_equals_the_plain_loss():
    head = torch.nn.Linear(8, 5, bias=False).double()
    hidden = torch.randn(2, 13, 8, dtype=torch.float64)
    targets = torch.randint(0, 5, (2, 13))
    with torch.no_grad():
        chunked = chunked_cross_entropy(hidden, head, targets, logits_per_chunk=5 * 4)
        torch.testing.assert_close(chunked, plain_loss(hidden, head, targets), rtol=1e-12, atol=0)


def test_chunked_loss_never_keeps_full_vocabulary_logits():
    """Saved for backward: the hidden states (and targets), never [B*N, V] logits."""
    vocab, rows_per_chunk = 1000, 8
    head = torch.nn.Linear(16, vocab, bias=False)
    hidden = torch.randn(4, 64, 16, requires_grad=True)
    targets = torch.randint(0, vocab, (4, 64))

    def largest_saved(loss_fn) -> int:
        sizes = []

        def pack(tensor):
            sizes.append(tensor.untyped_storage().nbytes())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss_fn()
        return max(sizes)

    plain = largest_saved(lambda: plain_loss(hidden, head, targets))
    chunked = largest_saved(
        lambda: chunked_cross_entropy(hidden, head, targets, vocab * rows_per_chunk)
    )
    assert plain >= 4 * 64 * vocab * 4  # the fp32 logits of every position
    assert chunked <= max(hidden.untyped_storage().nbytes(), vocab * 16 * 4)


def test_model_loss_is_the_chunked_loss_of_its_logits():
    model = build("full").double()
    ids, targets = ids_and_targets(37)
    torch.testing.assert_close(
        model(ids, targets=targets),
        F.cross_entropy(model(ids).flatten(0, 1), targets.flatten()),
        rtol=1e-12,
        atol=1e-12,
    )
