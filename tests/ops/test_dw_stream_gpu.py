"""The experts block's dW on a side stream (``moe_tune.ops.dw_stream``) on a CUDA GPU: the
gradients equal those made in order on the current stream (same kernels: bitwise), read right
after the backward with no synchronisation (the join orders them), eager and graphed; the cases
that must stay in order (a gradient already there, a hook, create_graph, a direct call outside a
backward) do, and accumulate correctly.

Run: ``python -m pytest -m gpu tests/ops/test_dw_stream_gpu.py -q``.
"""

from __future__ import annotations

import pytest
import torch

from moe_tune.ops import block, dw_stream, graphs
from moe_tune.ops.moe_experts import moe_experts

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore::moe_tune.errors.CacheWarning")]

T, H, I, E, K = 2048, 1024, 512, 32, 4  # dW long enough that a missing join would be read early


@pytest.fixture(autouse=True)
def streams_seen(monkeypatch):
    """Every ``dw_stream.side`` answer; gradients poisoned (NaN) until written."""
    def nan_alloc(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    seen = []
    real = dw_stream.side

    def side(weights):
        stream = real(weights)
        seen.append(stream)
        return stream

    monkeypatch.setattr(block, "_alloc", nan_alloc)
    monkeypatch.setattr(dw_stream, "side", side)
    graphs.reset()
    yield seen
    dw_stream.enable(True)
    graphs.enable(False)
    graphs.reset()


def inputs(seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    idx = torch.topk(torch.randn(T, E, device="cuda", generator=g), K, dim=-1).indices
    return (torch.randn(T, H, device="cuda", generator=g).bfloat16(),
            (torch.randn(E, 2 * I, H, device="cuda", generator=g) / H**0.5).bfloat16(),
            (torch.randn(E, H, I, device="cuda", generator=g) / I**0.5).bfloat16(),
            idx,
            torch.softmax(torch.randn(T, K, device="cuda", generator=g), -1).bfloat16(),
            torch.randn(T, H, device="cuda", generator=g).bfloat16())


def leaves(x, w1, w2, wts):
    return [t.clone().requires_grad_() for t in (x, w1, w2, wts)]


def read_grads(ts):
    """The gradients as the next kernels on the current stream see them (no synchronisation)."""
    return [t.grad.float() * 1.0 for t in ts]


@pytest.mark.parametrize("graphed", [False, True], ids=["eager", "graphed"])
def test_side_stream_gradients_equal_in_order_ones(streams_seen, graphed):
    graphs.enable(graphed)
    _, w1, w2, *_ = inputs(0)
    weights = {on: [w.clone().requires_grad_() for w in (w1, w2)] for on in (False, True)}  # fixed: graph keys
    for call in range(3):  # graphs capture on a key's second call
        x, _, _, idx, wts, grad = inputs(call + 1)
        runs = []
        for on in (False, True):
            dw_stream.enable(on)
            a, b = weights[on]
            a.grad = b.grad = None
            ts = [x.clone().requires_grad_(), a, b, wts.clone().requires_grad_()]
            moe_experts(ts[0], a, b, idx, ts[3]).backward(grad)
            runs.append(read_grads(ts))
        for name, want, got in zip(("hidden", "gate_up_w", "down_w", "top_k_weights"), *runs):
            assert not got.isnan().any(), (call, name)
            assert torch.equal(got, want), (call, name)
    assert [s is None for s in streams_seen] == [True, False] * 3
    assert streams_seen[-1] != torch.cuda.current_stream()
    assert (graphs.held_bytes() > 0) == graphed


def test_a_second_micro_batch_accumulates_in_order(streams_seen):
    x, w1, w2, idx, wts, grad = inputs(7)
    sums = []
    for on in (False, True):
        dw_stream.enable(on)
        ts = leaves(x, w1, w2, wts)
        for scale in (1.0, -0.5):
            moe_experts(ts[0], ts[1], ts[2], idx, ts[3]).backward(grad * scale)
        sums.append(read_grads(ts))
    # On: the first backward's dW on the side stream, the second's in order (the .grad is there).
    assert [s is None for s in streams_seen] == [True, True, False, True]
    for want, got in zip(*sums):
        assert torch.equal(got, want)


def test_hooks_and_create_graph_keep_the_dw_in_order(streams_seen):
    x, w1, w2, idx, wts, grad = inputs(3)
    dw_stream.enable(True)
    ts = leaves(x, w1, w2, wts)
    seen_by_hook = []
    ts[1].register_hook(lambda g: seen_by_hook.append(g.float().sum()))
    moe_experts(ts[0], ts[1], ts[2], idx, ts[3]).backward(grad)
    ts2 = leaves(x, w1, w2, wts)
    ts2[2].register_post_accumulate_grad_hook(lambda p: seen_by_hook.append(p.grad.float().sum()))
    moe_experts(ts2[0], ts2[1], ts2[2], idx, ts2[3]).backward(grad)
    ts3 = leaves(x, w1, w2, wts)
    moe_experts(ts3[0], ts3[1], ts3[2], idx, ts3[3]).backward(grad, create_graph=True)
    assert streams_seen == [None, None, None]
    assert all(torch.isfinite(v) for v in seen_by_hook) and len(seen_by_hook) == 2
    assert torch.equal(ts[1].grad, ts2[1].grad) and torch.equal(ts2[2].grad, ts3[2].grad)


def test_outside_a_backward_there_is_no_side_stream():
    w = torch.zeros(4, 4, device="cuda", requires_grad=True)
    with torch.no_grad():
        assert dw_stream.side([w]) is None  # nothing would join it
    dw_stream.enable(False)
    assert dw_stream.side([w]) is None
