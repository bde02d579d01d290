"""The experts block on a CUDA GPU: bf16/fp16 against the float64 reference, Inductor tracing
into the kernels under ``torch.compile(fullgraph=True)``, no host synchronisation, and CUDA-graph
capture of forward and backward (``torch.cuda.graph`` and ``mode="reduce-overhead"``).

Run: ``python -m pytest -m gpu tests/ops -q``.
"""

from __future__ import annotations

import pytest
import torch

from moe_tune.ops import block, custom_ops
from moe_tune.ops.moe_experts import moe_experts
from moe_tune.reference import relative_error
from moe_tune.reference.moe_experts import reference_moe_experts, routing_weight_grad_scale

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore::moe_tune.errors.CacheWarning")]

# dtype, relative-error bound against float64: H, A and the down output are rounded once each.
TOLERANCES = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
# The routing-weight gradient is one dot product over I per slot whose terms can cancel: bounded
# per slot against the sum of its terms' magnitudes (routing_weight_grad_scale), a few units of
# the dtype's precision (bf16: 2^-8 ≈ 3.9e-3, fp16: 2^-11 ≈ 4.9e-4).
WEIGHT_GRAD_TOLERANCES = {torch.bfloat16: 2e-2, torch.float16: 3e-3}

# name, T, H, I, E, k
SHAPES = [
    ("one-token", 1, 256, 128, 8, 2),  # M=2: six of eight experts empty
    ("small", 512, 256, 128, 8, 2),
    ("qwen3-30b-a3b", 256, 2048, 768, 128, 8),  # the model's expert shapes, a short micro-batch
    ("one-expert", 300, 256, 128, 1, 1),  # E=1, k=1: one long expert
    ("odd-dims", 200, 200, 72, 8, 2),  # H, I not multiples of 64: masked tiles in every kernel
]

DIFFERENTIABLE = ("hidden", "gate_up_w", "down_w", "top_k_weights")


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    def nan_alloc(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(block, "_alloc", nan_alloc)


def make_block(T, H, I, E, k, dtype, leave_last_expert_empty=True):
    experts = E - 1 if leave_last_expert_empty and k < E else E
    logits = torch.randn(T, experts, device="cuda")
    top_k_index = torch.topk(logits, k, dim=-1).indices
    return dict(
        hidden=torch.randn(T, H, device="cuda", dtype=dtype),
        gate_up_w=(torch.randn(E, 2 * I, H, device="cuda") / H**0.5).to(dtype),
        down_w=(torch.randn(E, H, I, device="cuda") / I**0.5).to(dtype),
        top_k_index=top_k_index,
        top_k_weights=torch.softmax(torch.randn(T, k, device="cuda"), -1).to(dtype),
    )


def run_block(fn, inputs, grad_out):
    leaves = {name: t.clone().requires_grad_(name in DIFFERENTIABLE) for name, t in inputs.items()}
    out = fn(**leaves)
    grads = torch.autograd.grad(out, [leaves[n] for n in DIFFERENTIABLE], grad_out.to(out.dtype))
    return out, dict(zip(DIFFERENTIABLE, grads))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name, T, H, I, E, k", SHAPES, ids=[s[0] for s in SHAPES])
def test_forward_and_gradients_match_reference(name, T, H, I, E, k, dtype):
    inputs = make_block(T, H, I, E, k, dtype)
    grad_out = torch.randn(T, H, device="cuda", dtype=dtype)
    run_block(moe_experts, inputs, grad_out)  # the first call goes through Triton's own launch path
    out, grads = run_block(moe_experts, inputs, grad_out)  # this one through the cached launchers
    ref_inputs = {n: t.double() if t.is_floating_point() else t for n, t in inputs.items()}
    ref, ref_grads = run_block(reference_moe_experts, ref_inputs, grad_out.double())
    tol = TOLERANCES[dtype]
    assert relative_error(out, ref) < tol
    for grad_name in ("hidden", "gate_up_w", "down_w"):
        assert relative_error(grads[grad_name], ref_grads[grad_name]) < tol, grad_name
    scale = routing_weight_grad_scale(inputs["hidden"], inputs["gate_up_w"], inputs["down_w"],
                                      inputs["top_k_index"], grad_out)
    weight_err = (grads["top_k_weights"].double() - ref_grads["top_k_weights"]).abs() / scale.clamp_min(1e-30)
    assert weight_err.max().item() < WEIGHT_GRAD_TOLERANCES[dtype]
    if k < E:  # make_block left the last expert without rows: its gradients are exact zeros
        assert torch.equal(grads["gate_up_w"][E - 1], torch.zeros_like(grads["gate_up_w"][E - 1]))
        assert torch.equal(grads["down_w"][E - 1], torch.zeros_like(grads["down_w"][E - 1]))


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_inductor_traces_into_the_kernels(dynamic):
    torch._dynamo.reset()
    compiled = torch.compile(moe_experts, fullgraph=True, dynamic=dynamic)
    for T in (384, 512):
        inputs = make_block(T, 256, 128, 8, 2, torch.bfloat16)
        grad_out = torch.randn(T, 256, device="cuda", dtype=torch.bfloat16)
        out, grads = run_block(compiled, inputs, grad_out)
        eager_out, eager_grads = run_block(moe_experts, inputs, grad_out)
        # Same kernels and configs; only Inductor's reduction over the k slots may sum differently.
        assert relative_error(out, eager_out) < 1e-3
        for name in DIFFERENTIABLE:
            assert relative_error(grads[name], eager_grads[name]) < 1e-3, name


@pytest.mark.parametrize("trainable", [DIFFERENTIABLE, ("hidden", "top_k_weights")], ids=["full", "frozen-experts"])
def test_no_host_synchronisation(trainable):
    inputs = make_block(512, 256, 128, 8, 2, torch.bfloat16)
    grad_out = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    leaves = {name: t.clone().requires_grad_(name in trainable) for name, t in inputs.items()}
    moe_experts(**leaves).backward(grad_out)  # first call: compiles kernels, reads the cache
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = moe_experts(**leaves)
        out.backward(grad_out)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()


def _graph_inputs(T=512):
    inputs = make_block(T, 256, 128, 8, 2, torch.bfloat16)
    leaves = {name: t.clone().requires_grad_(name in DIFFERENTIABLE) for name, t in inputs.items()}
    return inputs, leaves, torch.randn(T, 256, device="cuda", dtype=torch.bfloat16)


def test_cuda_graph_capture():
    inputs, leaves, grad_out = _graph_inputs()
    eager_out, eager_grads = run_block(moe_experts, inputs, grad_out)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the capture: compiles, reads the cache
        moe_experts(**leaves).backward(grad_out)
    torch.cuda.current_stream().wait_stream(stream)
    for t in leaves.values():
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe_experts(**leaves)
        out.backward(grad_out)
    graph.replay()
    torch.cuda.synchronize()
    assert relative_error(out, eager_out) < 1e-3
    for name in DIFFERENTIABLE:
        assert relative_error(leaves[name].grad, eager_grads[name]) < 1e-3, name


def test_reduce_overhead_compile():
    torch._dynamo.reset()
    compiled = torch.compile(moe_experts, mode="reduce-overhead", fullgraph=True)
    inputs, _, grad_out = _graph_inputs()
    eager_out, eager_grads = run_block(moe_experts, inputs, grad_out)
    for _ in range(3):  # warm-up, record, replay
        out, grads = run_block(compiled, inputs, grad_out)
    assert relative_error(out, eager_out) < 1e-3
    for name in DIFFERENTIABLE:
        assert relative_error(grads[name], eager_grads[name]) < 1e-3, name


def test_opcheck_on_gpu():
    inputs = make_block(64, 256, 128, 8, 2, torch.bfloat16)
    for name in DIFFERENTIABLE:
        inputs[name].requires_grad_()
    torch.library.opcheck(custom_ops.moe_experts_fwd, (*inputs.values(), "silu"))
