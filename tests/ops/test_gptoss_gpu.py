"""The gpt-oss experts block on a CUDA GPU: bf16/fp16 against the float64 reference (both sides of
each clamp hit; the gradients against its variant with x·W1 rounded as the kernels store it, see
``gptoss_reference``), Inductor tracing into the kernels under ``torch.compile(fullgraph=True)``,
no host synchronisation, CUDA-graph capture, and ``opcheck`` of the ops.

Run: ``python -m pytest -m gpu tests/ops/test_gptoss_gpu.py -q``.
"""

from __future__ import annotations

import functools

import pytest
import torch
from gptoss_reference import reference_rounded_h

from moe_tune.ops import gptoss
from moe_tune.ops.gptoss import gptoss_experts
from moe_tune.reference import relative_error
from moe_tune.reference.gptoss import reference_gptoss_experts, routing_weight_grad_scale

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore::moe_tune.errors.CacheWarning")]

# dtype, relative-error bound against float64: H, A, dA_raw, dH and the down output are rounded once each
# (the gradients' reference rounds H too: where that moves a pre-activation across a clamp, the
# gradient changes by all or nothing, 2-3% of d hidden in bf16, which no tolerance here covers).
# The kernels' H can still differ from the reference's rounded H by one unit where the float32 and
# float64 sums round differently, and an element within that unit of ±7 flips its clamp: in fp16 at
# the gpt-oss-20b shape that alone moved d hidden by 3.2e-3 (H100, 2026-11-28), hence 5e-3 there.
TOLERANCES = {torch.bfloat16: 1.5e-2, torch.float16: 5e-3}
# Per slot against the sum of the terms' magnitudes (bf16: 2^-8 ≈ 3.9e-3, fp16: 2^-11 ≈ 4.9e-4).
WEIGHT_GRAD_TOLERANCES = {torch.bfloat16: 2e-2, torch.float16: 3e-3}
LIMIT, ALPHA = 7.0, 1.702  # the released models' constants

# name, T, H, I, E, k
SHAPES = [
    ("one-token", 1, 256, 128, 8, 2),  # M=2: six of eight experts empty
    ("small", 512, 256, 128, 8, 2),
    ("gpt-oss-20b", 256, 2880, 2880, 32, 4),  # the model's expert shapes, a short micro-batch
    ("one-expert", 300, 256, 128, 1, 1),  # E=1, k=1: one long expert
    ("odd-dims", 200, 200, 72, 8, 2),  # H, I not multiples of 64: masked tiles in every kernel
]

NAMES = ("hidden", "gate_up_w", "gate_up_b", "down_w", "down_b", "top_k_index", "top_k_weights")
DIFFERENTIABLE = ("hidden", "gate_up_w", "gate_up_b", "down_w", "down_b", "top_k_weights")


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    def nan_alloc(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(gptoss, "_alloc", nan_alloc)


def make_block(T, H, I, E, k, dtype, leave_last_expert_empty=True):
    experts = E - 1 if leave_last_expert_empty and k < E else E
    logits = torch.randn(T, experts, device="cuda")
    return dict(
        hidden=torch.randn(T, H, device="cuda", dtype=dtype),
        # pre-activations with std ~ 5: both tails of both clamps at ±7 are hit
        gate_up_w=(4 * torch.randn(E, H, 2 * I, device="cuda") / H**0.5).to(dtype),
        gate_up_b=(3 * torch.randn(E, 2 * I, device="cuda")).to(dtype),
        down_w=(torch.randn(E, I, H, device="cuda") / I**0.5).to(dtype),
        down_b=torch.randn(E, H, device="cuda").to(dtype),
        top_k_index=torch.topk(logits, k, dim=-1).indices,
        top_k_weights=torch.softmax(torch.randn(T, k, device="cuda"), -1).to(dtype),
    )


def run_block(fn, inputs, grad_out):
    leaves = {name: t.clone().requires_grad_(name in DIFFERENTIABLE) for name, t in inputs.items()}
    out = fn(*(leaves[n] for n in NAMES), limit=LIMIT, alpha=ALPHA)
    grads = torch.autograd.grad(out, [leaves[n] for n in DIFFERENTIABLE], grad_out.to(out.dtype))
    return out, dict(zip(DIFFERENTIABLE, grads))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name, T, H, I, E, k", SHAPES, ids=[s[0] for s in SHAPES])
def test_forward_and_gradients_match_reference(name, T, H, I, E, k, dtype):
    inputs = make_block(T, H, I, E, k, dtype)
    grad_out = torch.randn(T, H, device="cuda", dtype=dtype)
    out, grads = run_block(gptoss_experts, inputs, grad_out)
    ref_inputs = {n: t.double() if t.is_floating_point() else t for n, t in inputs.items()}
    ref, _ = run_block(reference_gptoss_experts, ref_inputs, grad_out.double())
    _, ref_grads = run_block(functools.partial(reference_rounded_h, h_dtype=dtype), ref_inputs, grad_out.double())
    tol = TOLERANCES[dtype]
    assert relative_error(out, ref) < tol
    for grad_name in DIFFERENTIABLE[:-1]:
        assert relative_error(grads[grad_name], ref_grads[grad_name]) < tol, grad_name
    scale = routing_weight_grad_scale(*(inputs[n] for n in NAMES[:6]), grad_out, limit=LIMIT, alpha=ALPHA)
    weight_err = (grads["top_k_weights"].double() - ref_grads["top_k_weights"]).abs() / scale.clamp_min(1e-30)
    assert weight_err.max().item() < WEIGHT_GRAD_TOLERANCES[dtype]
    if k < E:
        for grad_name in ("gate_up_w", "gate_up_b", "down_w", "down_b"):
            assert torch.equal(grads[grad_name][E - 1], torch.zeros_like(grads[grad_name][E - 1])), grad_name


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_inductor_traces_into_the_kernels(dynamic):
    torch._dynamo.reset()
    compiled = torch.compile(gptoss_experts, fullgraph=True, dynamic=dynamic)
    for T in (384, 512):
        inputs = make_block(T, 256, 128, 8, 2, torch.bfloat16)
        grad_out = torch.randn(T, 256, device="cuda", dtype=torch.bfloat16)
        out, grads = run_block(compiled, inputs, grad_out)
        eager_out, eager_grads = run_block(gptoss_experts, inputs, grad_out)
        # Same kernels and configs: only the order of float reductions may differ.
        assert relative_error(out, eager_out) < 1e-3
        for name in DIFFERENTIABLE:
            assert relative_error(grads[name], eager_grads[name]) < 1e-3, name


@pytest.mark.parametrize("trainable", [DIFFERENTIABLE, ("hidden", "top_k_weights")], ids=["full", "frozen-experts"])
def test_no_host_synchronisation(trainable):
    inputs = make_block(512, 256, 128, 8, 2, torch.bfloat16)
    grad_out = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    leaves = {name: t.clone().requires_grad_(name in trainable) for name, t in inputs.items()}
    gptoss_experts(*(leaves[n] for n in NAMES), limit=LIMIT, alpha=ALPHA).backward(grad_out)  # compiles kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = gptoss_experts(*(leaves[n] for n in NAMES), limit=LIMIT, alpha=ALPHA)
        out.backward(grad_out)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()


def test_cuda_graph_capture():
    T = 512
    inputs = make_block(T, 256, 128, 8, 2, torch.bfloat16)
    grad_out = torch.randn(T, 256, device="cuda", dtype=torch.bfloat16)
    eager_out, eager_grads = run_block(gptoss_experts, inputs, grad_out)
    leaves = {name: t.clone().requires_grad_(name in DIFFERENTIABLE) for name, t in inputs.items()}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the capture: compiles, reads the cache
        gptoss_experts(*(leaves[n] for n in NAMES), limit=LIMIT, alpha=ALPHA).backward(grad_out)
    torch.cuda.current_stream().wait_stream(stream)
    for t in leaves.values():
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gptoss_experts(*(leaves[n] for n in NAMES), limit=LIMIT, alpha=ALPHA)
        out.backward(grad_out)
    graph.replay()
    torch.cuda.synchronize()
    assert relative_error(out, eager_out) < 1e-3
    for name in DIFFERENTIABLE:
        assert relative_error(leaves[name].grad, eager_grads[name]) < 1e-3, name


def test_opcheck_on_gpu():
    inputs = make_block(64, 256, 128, 8, 2, torch.bfloat16)
    for name in DIFFERENTIABLE:
        inputs[name].requires_grad_()
    torch.library.opcheck(gptoss.gptoss_experts_fwd, (*(inputs[n] for n in NAMES), LIMIT, ALPHA))
