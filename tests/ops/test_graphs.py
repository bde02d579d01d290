"""The CUDA-graph switch of the eager experts block (``moe_tune.ops.graphs``), off the GPU: how it is
turned on, and that a call it does not apply to (CPU tensors, Triton's interpreter) runs the eager
block unchanged. The graphs themselves are tested on the GPU (test_graphs_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from moe_tune.errors import InvalidInputError
from moe_tune.ops import graphs
from moe_tune.ops.moe_experts import moe_experts
from moe_tune.reference import relative_error
from moe_tune.reference.moe_experts import reference_moe_experts


@pytest.fixture(autouse=True)
def restore():
    before = graphs._enabled
    yield
    graphs._enabled = before
    graphs.reset()


@pytest.mark.parametrize("value, on", [("1", True), ("true", True), (" ON ", True), ("0", False), ("", False),
                                       ("no", False)])
def test_environment_variable_turns_graphs_on(monkeypatch, value, on):
    monkeypatch.setenv(graphs.ENV_VAR, value)
    graphs._enabled = None
    assert graphs.enabled() is on
    graphs.enable(not on)  # enable() overrides the environment
    assert graphs.enabled() is (not on)


@pytest.mark.parametrize("value, mib", [("", graphs.DEFAULT_BUDGET_MIB), ("512", 512), (" 0 ", 0), ("1.5", 1.5)])
def test_memory_budget_from_the_environment(monkeypatch, value, mib):
    monkeypatch.setenv(graphs.BUDGET_ENV_VAR, value)
    assert graphs.budget_bytes() == int(mib * 2**20)


@pytest.mark.parametrize("value", ["lots", "-1", "nan"])
def test_a_bad_memory_budget_is_one_clear_error(monkeypatch, value):
    monkeypatch.setenv(graphs.BUDGET_ENV_VAR, value)
    with pytest.raises(InvalidInputError, match=graphs.BUDGET_ENV_VAR):
        graphs.budget_bytes()


def test_calls_graphs_do_not_apply_to_run_the_eager_block():
    graphs.enable(True)
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    T, H, I, E, k = 24, 32, 16, 4, 2
    x = torch.randn(T, H, generator=gen, requires_grad=True)
    w1 = (torch.randn(E, 2 * I, H, generator=gen) / H**0.5).requires_grad_()
    w2 = (torch.randn(E, H, I, generator=gen) / I**0.5).requires_grad_()
    idx = torch.topk(torch.randn(T, E, generator=gen), k, dim=-1).indices
    wts = torch.softmax(torch.randn(T, k, generator=gen), -1).requires_grad_()
    assert graphs.experts_block(x, w1, w2, idx, wts) is None
    out = moe_experts(x, w1, w2, idx, wts)
    ref = reference_moe_experts(x, w1, w2, idx, wts)
    assert relative_error(out, ref) < 1e-4
    out.backward(torch.randn(T, H, generator=gen))
    assert all(torch.isfinite(t.grad).all() for t in (x, w1, w2, wts))
    assert not graphs._KEYS
