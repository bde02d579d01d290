"""The experts block's opt-in CUDA graphs (``moe_tune.ops.graphs``) on a CUDA GPU: every replay gives
what the eager block gives on the same inputs (same kernels: bitwise), with fresh inputs and
routing each call; the rules on leases (several forwards before their backwards, a dropped
forward, a second backward), frozen weights, no_grad, saved-tensor hooks and the row limit; no
host synchronisation once captured.

Run: ``python -m pytest -m gpu tests/ops/test_graphs_gpu.py -q``.
"""

from __future__ import annotations

import gc

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from moe_tune.ops import block, graphs
from moe_tune.ops.moe_experts import moe_experts

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore::moe_tune.errors.CacheWarning")]

NAMES = ("hidden", "gate_up_w", "down_w", "top_k_index", "top_k_weights")
DIFFERENTIABLE = ("hidden", "gate_up_w", "down_w", "top_k_weights")
T, H, I, E, K = 128, 256, 128, 16, 4  # 512 routed rows


@pytest.fixture(autouse=True)
def graphs_on(monkeypatch):
    def nan_alloc(shape, dtype, device):  # poisoned, in the graphs too (the fill is captured)
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(block, "_alloc", nan_alloc)
    graphs.reset()
    graphs.enable(True)
    yield
    graphs.enable(False)
    graphs.reset()


def weights(dtype=torch.bfloat16, trainable=True):
    w1 = (torch.randn(E, 2 * I, H, device="cuda") / H**0.5).to(dtype).requires_grad_(trainable)
    w2 = (torch.randn(E, H, I, device="cuda") / I**0.5).to(dtype).requires_grad_(trainable)
    return w1, w2


def batch(tokens=T, dtype=torch.bfloat16):
    """Fresh hidden states, routing (one expert left empty) and output gradient."""
    top_k_index = torch.topk(torch.randn(tokens, E - 1, device="cuda"), K, dim=-1).indices
    return (torch.randn(tokens, H, device="cuda", dtype=dtype).requires_grad_(),
            top_k_index,
            torch.softmax(torch.randn(tokens, K, device="cuda"), -1).to(dtype).requires_grad_(),
            torch.randn(tokens, H, device="cuda", dtype=dtype))


def fwd_bwd(w1, w2, x, idx, wts, grad, *, graphed: bool):
    graphs.enable(graphed)
    leaves = [t.detach().requires_grad_(t.requires_grad) for t in (x, w1, w2, wts)]
    out = moe_experts(leaves[0], leaves[1], leaves[2], idx, leaves[3])
    out.backward(grad)
    graphs.enable(True)
    return out.detach(), [t.grad for t in leaves]


def assert_same(graphed, eager):
    (out_g, grads_g), (out_e, grads_e) = graphed, eager
    assert torch.equal(out_g, out_e)
    for name, g, e in zip(DIFFERENTIABLE, grads_g, grads_e):
        assert (g is None) == (e is None), name
        if e is not None:
            assert torch.equal(g, e), name


def pairs():
    return sum(len(key.pairs) for key in graphs._KEYS.values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_replays_match_the_eager_block_on_fresh_inputs(dtype):
    w1, w2 = weights(dtype)
    for step in range(5):  # call 1 eager, call 2 captures, then replays
        inputs = batch(dtype=dtype)
        assert_same(fwd_bwd(w1, w2, *inputs, graphed=True), fwd_bwd(w1, w2, *inputs, graphed=False))
    assert pairs() == 1


@pytest.mark.parametrize("wanted", ["hidden", "routing-weights", "both"])
def test_gradients_of_some_inputs_only(wanted):
    # The backward copies out the input gradients autograd asks for: both in one launch, or one.
    w1, w2 = weights()
    for _ in range(4):
        x, idx, wts, grad = batch()
        x.requires_grad_(wanted != "routing-weights")
        wts.requires_grad_(wanted != "hidden")
        assert_same(fwd_bwd(w1, w2, x, idx, wts, grad, graphed=True), fwd_bwd(w1, w2, x, idx, wts, grad, graphed=False))
    assert pairs() == 1


def test_an_expanded_output_gradient():
    # ``out.sum().backward()`` hands the backward an expanded gradient (every stride 0): copied into
    # the static buffer by torch rather than by the bound copy, which takes contiguous tensors.
    w1, w2 = weights()
    for _ in range(4):
        x, idx, wts, _ = batch()
        results = []
        for graphed in (True, False):
            graphs.enable(graphed)
            leaves = [t.detach().requires_grad_() for t in (x, w1, w2, wts)]
            out = moe_experts(leaves[0], leaves[1], leaves[2], idx, leaves[3])
            out.sum().backward()
            results.append((out.detach(), [t.grad for t in leaves]))
        graphs.enable(True)
        assert_same(*results)
    assert pairs() == 1


def test_float32_follows_a_change_of_matmul_precision():
    # Float32 products run as TF32 or three TF32 products by torch's setting: a change between
    # steps is a new graph pair, whose replays match the eager block under the new setting.
    w1, w2 = weights(torch.float32)
    before = torch.get_float32_matmul_precision()
    try:
        for precision in ("highest", "high"):
            torch.set_float32_matmul_precision(precision)
            for _ in range(3):
                inputs = batch(dtype=torch.float32)
                assert_same(fwd_bwd(w1, w2, *inputs, graphed=True), fwd_bwd(w1, w2, *inputs, graphed=False))
    finally:
        torch.set_float32_matmul_precision(before)
    assert pairs() == 2


def test_frozen_weights_and_no_grad():
    w1, w2 = weights(trainable=False)
    for _ in range(3):
        inputs = batch()
        assert_same(fwd_bwd(w1, w2, *inputs, graphed=True), fwd_bwd(w1, w2, *inputs, graphed=False))
    x, idx, wts, _ = batch()
    with torch.no_grad():
        eager = moe_experts(x, w1, w2, idx, wts)
        graphs.enable(True)
        for _ in range(3):
            assert torch.equal(moe_experts(x, w1, w2, idx, wts), eager)


def test_several_forwards_before_their_backwards():
    """Gradient accumulation over three forwards: two lease a pair each, the third runs eagerly."""
    w1, w2 = weights()
    fwd_bwd(w1, w2, *batch(), graphed=True)  # the first call: eager
    inputs = [batch() for _ in range(3)]
    eager = [fwd_bwd(w1, w2, *b, graphed=False) for b in inputs]
    outs, leaves = [], []
    for x, idx, wts, _ in inputs:
        leaf = [t.detach().requires_grad_() for t in (x, w1, w2, wts)]
        outs.append(moe_experts(leaf[0], leaf[1], leaf[2], idx, leaf[3]))
        leaves.append(leaf)
    assert pairs() == graphs.INSTANCES
    for out, leaf, (x, idx, wts, grad), (out_e, grads_e) in zip(reversed(outs), reversed(leaves), reversed(inputs),
                                                                 reversed(eager)):
        out.backward(grad)
        assert_same((out.detach(), [t.grad for t in leaf]), (out_e, grads_e))


def test_a_dropped_forward_releases_its_pair():
    w1, w2 = weights()
    for _ in range(2):
        fwd_bwd(w1, w2, *batch(), graphed=True)
    x, idx, wts, _ = batch()
    for _ in range(4):  # forwards whose graphs are dropped unused (an evaluation under grad)
        moe_experts(x, w1, w2, idx, wts)
        gc.collect()
    assert pairs() == 1
    inputs = batch()
    assert_same(fwd_bwd(w1, w2, *inputs, graphed=True), fwd_bwd(w1, w2, *inputs, graphed=False))


def test_a_second_backward_is_refused():
    w1, w2 = weights()
    for _ in range(2):
        fwd_bwd(w1, w2, *batch(), graphed=True)
    x, idx, wts, grad = batch()
    out = moe_experts(x, w1, w2, idx, wts)
    out.backward(grad, retain_graph=True)
    with pytest.raises(RuntimeError, match="second time"):
        out.backward(grad)


def test_not_graphed_under_checkpointing_or_above_the_row_limit():
    w1, w2 = weights()
    for _ in range(3):
        x, idx, wts, grad = batch()
        checkpoint(moe_experts, x, w1, w2, idx, wts, use_reentrant=False).backward(grad)
    big = graphs.MAX_ROWS // K + 1
    for _ in range(3):
        fwd_bwd(w1, w2, *batch(big), graphed=True)
    assert pairs() == 0


def test_no_host_synchronisation_once_captured():
    w1, w2 = weights()
    for _ in range(2):
        fwd_bwd(w1, w2, *batch(), graphed=True)
    x, idx, wts, grad = batch()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = moe_experts(x, w1, w2, idx, wts)
        out.backward(grad)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out).all() and torch.isfinite(w1.grad).all()
    assert pairs() == 1


def test_weights_updated_in_place_between_replays():
    """An optimizer updates the weights in place: the graphs read them by address, so each replay
    sees the new values."""
    w1, w2 = weights()
    for _ in range(4):
        inputs = batch()
        assert_same(fwd_bwd(w1, w2, *inputs, graphed=True), fwd_bwd(w1, w2, *inputs, graphed=False))
        with torch.no_grad():
            w1.add_(torch.randn_like(w1), alpha=0.05)
            w2.mul_(1.1)
    assert pairs() == 1


def test_over_the_memory_budget_new_shapes_run_eagerly(monkeypatch):
    """With the budget spent, a shape not yet graphed runs eagerly (one warning); one already
    graphed stays graphed."""
    w1, w2 = weights()
    for _ in range(2):
        fwd_bwd(w1, w2, *batch(), graphed=True)
    assert pairs() == 1 and graphs.held_bytes() > 0
    monkeypatch.setenv(graphs.BUDGET_ENV_VAR, str(graphs.held_bytes() / 2**20))
    with pytest.warns(graphs.GraphWarning, match="budget"):
        for _ in range(3):
            inputs = batch(T // 2)
            assert_same(fwd_bwd(w1, w2, *inputs, graphed=True), fwd_bwd(w1, w2, *inputs, graphed=False))
    inputs = batch()
    assert_same(fwd_bwd(w1, w2, *inputs, graphed=True), fwd_bwd(w1, w2, *inputs, graphed=False))
    assert pairs() == 1
