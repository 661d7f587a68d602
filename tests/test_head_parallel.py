"""longctx.ops.head_parallel: a CPU kernel's heads split across threads, one region per call."""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch

from longctx.ops import head_parallel
from longctx.ops.head_parallel import across_heads
from longctx.ops.launches import LaunchCounter


@pytest.fixture
def two_threads(monkeypatch):
    monkeypatch.setattr(head_parallel, "MIN_GROUP_ELEMENTS", 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def _kernel(q, scale, bias):
    """Per head: a cumulative sum of q times the head's scale plus a shared bias row."""
    return (q.cumsum(-2) * scale[:, None, None] + bias).tanh(), q.sum(-1)


def _inputs():
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, 7, 3, dtype=torch.float64, generator=generator).requires_grad_()
    scale = torch.randn(5, dtype=torch.float64, generator=generator).requires_grad_()
    bias = torch.randn(3, dtype=torch.float64, generator=generator).requires_grad_()
    return q, scale, bias


@pytest.mark.parametrize("hooks", [False, True])
def test_split_equals_the_whole_call_with_gradients(two_threads, hooks):
    """Heads cut along dim 1 of q and dim 0 of scale; `bias` is read whole by every group and its
    gradient is the sum over groups. With saved-tensor hooks active the groups are recomputed."""
    inputs = _inputs()
    want = _kernel(*inputs)
    want_grads = torch.autograd.grad(want[0].sum() + want[1].square().sum(), inputs)
    hooked = torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
    with hooked if hooks else contextlib.nullcontext():
        got = across_heads(_kernel, inputs, (1, 0, None))
    got_grads = torch.autograd.grad(got[0].sum() + got[1].square().sum(), inputs)
    kind = "_RecomputedBackward" if hooks else "_KeptGraphsBackward"
    assert type(got[0].grad_fn).__name__ == kind
    for a, b in zip((*got, *got_grads), (*want, *want_grads)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_without_gradients_no_graph_is_recorded(two_threads):
    inputs = _inputs()
    with torch.no_grad():
        got = across_heads(_kernel, inputs, (1, 0, None))
    assert got[0].grad_fn is None
    torch.testing.assert_close(got[0], _kernel(*inputs)[0].detach())


def test_groups_run_single_threaded_in_workers_and_the_caller_keeps_its_threads(two_threads):
    seen = []

    def record(q):
        seen.append((threading.current_thread().name, torch.get_num_threads(), q.shape[1]))
        return q * 2

    across_heads(record, (torch.zeros(1, 5, 4, 2),), (1,))
    assert sorted(heads for _, _, heads in seen) == [2, 3]
    assert all(name.startswith("longctx-heads") and threads == 1 for name, threads, _ in seen)
    assert torch.get_num_threads() == 2
    later = []
    thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert later == [2]  # threads started later begin with the caller's count, not the workers'


def test_unsplit_for_one_thread_small_calls_and_operator_counting(monkeypatch):
    calls = []

    def record(q):
        calls.append(threading.current_thread().name)
        return q + 1

    q = torch.zeros(1, 4, 8, 2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        across_heads(record, (q,), (1,))  # 64 elements: below the work threshold
        monkeypatch.setattr(head_parallel, "MIN_GROUP_ELEMENTS", 0)
        with LaunchCounter() as counter:  # counts every operator, as a GPU would launch them
            across_heads(record, (q,), (1,))
        torch.set_num_threads(1)
        across_heads(record, (q,), (1,))
    finally:
        torch.set_num_threads(threads)
    assert calls == [threading.current_thread().name] * 3
    assert counter.aten_ops == 1


def test_a_failing_group_raises_in_the_caller(two_threads):
    def fail_on_second_group(q):
        if q.shape[1] == 2 and float(q[0, 0, 0]) == 2:
            raise ValueError("group failed")
        return q

    q = torch.arange(4.0).view(1, 4, 1).expand(1, 4, 3).contiguous()
    with pytest.raises(ValueError, match="group failed"):
        across_heads(fail_on_second_group, (q,), (1,))


def test_tensors_that_disagree_on_the_head_count_are_refused(two_threads):
    with pytest.raises(ValueError, match="head count"):
        across_heads(lambda a, b: a, (torch.zeros(1, 4, 3), torch.zeros(3)), (1, 0))
