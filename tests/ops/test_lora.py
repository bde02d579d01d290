"""LoRA on the experts block (``moe_tune.moe_experts(..., lora=MoeLora(...))``) against the float64
plain-torch reference (W + ΔW built explicitly), in Triton's CPU interpreter: forward, the
gradients of the LoRA factors, the hidden states and the routing weights, the registered ops under
``opcheck`` and the block under ``torch.compile(fullgraph=True)``.

Fresh random inputs and routing per case; every buffer the bodies write through a kernel starts as
NaN (``lora_block._alloc`` is poisoned), so an element a kernel forgets fails the comparison.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from peft_layout import peft_flat

from moe_tune.errors import InvalidInputError
from moe_tune.ops import lora_block, lora_ops
from moe_tune.ops.lora import LoraFactors, MoeLora
from moe_tune.ops.moe_experts import moe_experts
from moe_tune.reference import relative_error
from moe_tune.reference.lora import reference_moe_experts_lora
from moe_tune.reference.moe_experts import routing_weight_grad_scale

pytestmark = [
    pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter tests; GPU has its own"),
    # Tiny shapes have no tuned cache entry: the runtime's heuristic-default warning is expected.
    pytest.mark.filterwarnings("ignore::moe_tune.errors.CacheWarning"),
]

# dtype, relative-error bound: fp16 rounds H, A, L1, L2 and the LoRA partial sums once each; fp32
# is exact up to summation order.
TOLERANCES = {torch.float16: 6e-3, torch.float32: 1e-5}
# The routing-weight gradient per slot, against the sum of its terms' magnitudes (see
# test_moe_experts.py): a few units of the dtype's precision.
WEIGHT_GRAD_TOLERANCES = {torch.float16: 4e-3, torch.float32: 1e-5}

# name, T, H, I, E, k, r
SHAPES = [
    ("one-token", 1, 32, 16, 4, 2, 4),  # T=1: most experts empty, M=2 rows
    ("empty-expert", 6, 32, 16, 4, 2, 8),  # expert E-1 never routed: its LoRA gradients are exactly zero
    ("rank-1", 7, 32, 16, 3, 2, 1),  # r=1: one-column L, a K=1 reduction
    ("rank-odd", 9, 32, 32, 5, 2, 5),  # r not a power of two: masked rank columns everywhere
    ("rank-wide", 5, 32, 16, 3, 2, 40),  # r = 40 > 32 > I: several blocks along r, rank above I
    ("odd-dims", 5, 20, 12, 3, 2, 3),  # H, I not multiples of 16: masked columns in every kernel
    ("top-1", 8, 32, 16, 4, 1, 6),  # one slot per token: the slot sums are copies
]

NAMES = ("hidden", "top_k_weights", "up_a", "up_b", "down_a", "down_b")


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    def nan_alloc(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(lora_block, "_alloc", nan_alloc)


def make_inputs(T, H, I, E, k, r, dtype, *, factors_dtype=None, leave_last_expert_empty=True):
    experts = E - 1 if leave_last_expert_empty and k < E else E
    fdt = factors_dtype or dtype
    return dict(
        hidden=torch.randn(T, H, dtype=dtype),
        gate_up_w=(torch.randn(E, 2 * I, H) / H**0.5).to(dtype),
        down_w=(torch.randn(E, H, I) / I**0.5).to(dtype),
        top_k_index=torch.stack([torch.randperm(experts)[:k] for _ in range(T)]),
        top_k_weights=torch.rand(T, k, dtype=dtype),
        # B as large as A: PEFT starts B at zero, which would hide every B-side mistake.
        up_a=(torch.randn(E, r, H) / H**0.5).to(fdt),
        up_b=(torch.randn(E, 2 * I, r) / r**0.5).to(fdt),
        down_a=(torch.randn(E, r, I) / I**0.5).to(fdt),
        down_b=(torch.randn(E, H, r) / r**0.5).to(fdt),
    )


def lora_of(leaves, projections, up_scaling=0.5, down_scaling=2.0):
    up = LoraFactors(leaves["up_a"], leaves["up_b"], up_scaling) if "gate_up" in projections else None
    down = LoraFactors(leaves["down_a"], leaves["down_b"], down_scaling) if "down" in projections else None
    return MoeLora(gate_up=up, down=down)


def run(fn, inputs, grad_out, projections=("gate_up", "down"), trainable=NAMES, cast=None):
    leaves = {n: (t.to(cast) if cast and t.is_floating_point() else t).clone() for n, t in inputs.items()}
    for n in trainable:
        leaves[n].requires_grad_()
    lora = lora_of(leaves, projections)
    out = fn(leaves["hidden"], leaves["gate_up_w"], leaves["down_w"], leaves["top_k_index"], leaves["top_k_weights"],
             lora=lora)
    wanted = [n for n in trainable if leaves[n].requires_grad and _used(n, projections)]
    grads = torch.autograd.grad(out, [leaves[n] for n in wanted], grad_out.to(out.dtype))
    return out, dict(zip(wanted, grads))


def _used(name, projections):
    return not name.startswith(("up_", "down_")) or ("gate_up" if name.startswith("up_") else "down") in projections


def reference(hidden, gate_up_w, down_w, top_k_index, top_k_weights, *, lora):
    return reference_moe_experts_lora(hidden, gate_up_w, down_w, top_k_index, top_k_weights, lora)


def adapted_weights(inputs, projections):
    lora = lora_of({n: t.double() if t.is_floating_point() else t for n, t in inputs.items()}, projections)
    w1, w2 = inputs["gate_up_w"].double(), inputs["down_w"].double()
    if lora.gate_up is not None:
        w1 = w1 + lora.gate_up.delta_weight()
    if lora.down is not None:
        w2 = w2 + lora.down.delta_weight()
    return w1, w2


def assert_matches_reference(inputs, grad_out, dtype, projections=("gate_up", "down"), trainable=NAMES):
    out, grads = run(moe_experts, inputs, grad_out, projections, trainable)
    ref, ref_grads = run(reference, inputs, grad_out.double(), projections, trainable, cast=torch.float64)
    tol = TOLERANCES[dtype]
    assert out.dtype == inputs["hidden"].dtype and out.shape == inputs["hidden"].shape
    assert relative_error(out, ref) < tol
    assert set(grads) == set(ref_grads)
    for name, grad in grads.items():
        assert grad.dtype == inputs[name].dtype, name
        assert torch.isfinite(grad).all(), name
        if name == "top_k_weights":
            w1, w2 = adapted_weights(inputs, projections)
            scale = routing_weight_grad_scale(inputs["hidden"], w1, w2, inputs["top_k_index"], grad_out)
            worst = ((grad.double() - ref_grads[name]).abs() / scale.clamp_min(1e-30)).max().item()
            assert worst < WEIGHT_GRAD_TOLERANCES[dtype], name
        else:
            assert relative_error(grad, ref_grads[name]) < tol, name
    return grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name, T, H, I, E, k, r", SHAPES, ids=[s[0] for s in SHAPES])
def test_forward_and_gradients_match_reference(name, T, H, I, E, k, r, dtype):
    inputs = make_inputs(T, H, I, E, k, r, dtype)
    grads = assert_matches_reference(inputs, torch.randn(T, H, dtype=dtype), dtype)
    routed = set(inputs["top_k_index"].flatten().tolist())
    for e in set(range(E)) - routed:  # an expert with no rows gets exact zero LoRA gradients
        for factor in ("up_a", "up_b", "down_a", "down_b"):
            assert torch.equal(grads[factor][e], torch.zeros_like(grads[factor][e])), factor


@pytest.mark.parametrize("projections", [("gate_up",), ("down",)], ids=["gate-up-only", "down-only"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_one_projection_with_lora(projections, dtype):
    # The other projection runs the base block's fused epilogues (SwiGLU forward / backward).
    T, H, I, E, k, r = 9, 32, 16, 4, 2, 4
    inputs = make_inputs(T, H, I, E, k, r, dtype)
    assert_matches_reference(inputs, torch.randn(T, H, dtype=dtype), dtype, projections)


def test_float32_factors_on_half_weights():
    # PEFT keeps bf16/fp16 models' adapters in float32 (autocast_adapter_dtype): the factors are
    # cast to the weights' dtype and their gradients come back in float32.
    T, H, I, E, k, r = 7, 32, 16, 4, 2, 4
    inputs = make_inputs(T, H, I, E, k, r, torch.float16, factors_dtype=torch.float32)
    assert_matches_reference(inputs, torch.randn(T, H, dtype=torch.float16), torch.float16)


@pytest.mark.parametrize("trainable", [("up_a", "up_b", "down_a", "down_b"), ("hidden",), ("up_b", "down_a")],
                         ids=["factors-only", "hidden-only", "two-factors"])
def test_partial_gradients(trainable):
    # The first layer's hidden states need no gradient; frozen factors still pass one to hidden.
    T, H, I, E, k, r = 9, 32, 16, 4, 2, 4
    inputs = make_inputs(T, H, I, E, k, r, torch.float32)
    assert_matches_reference(inputs, torch.randn(T, H), torch.float32, trainable=trainable)


def test_peft_layout_factors_are_views():
    # PEFT's lora_B.weight [N, r·E] interleaves the experts rank-major: from_peft's views compute
    # the same ΔW as PEFT's einsum, and the block's gradients land on the flat parameters.
    E, N, K, r = 3, 10, 6, 2
    a_flat, b_flat = torch.randn(E * r, K), torch.randn(N, r * E)
    factors = LoraFactors.from_peft(a_flat, b_flat, E, 0.25)
    peft_delta = torch.einsum("o r e, e r i -> e o i", b_flat.view(N, r, E), a_flat.view(E, r, K)) * 0.25
    assert torch.allclose(factors.delta_weight(), peft_delta, atol=1e-6)
    assert factors.lora_A.data_ptr() == a_flat.data_ptr() and factors.lora_B.data_ptr() == b_flat.data_ptr()


def _tma_loads(monkeypatch):
    """Every LoRA pass on TMA loads, as the H200 defaults choose them (the interpreter's default
    configs have none): the descriptors take each weight's innermost stride as 1."""
    configs = lora_block.lora_configs

    def with_tma(*args, **kwargs):
        return {name: dataclasses.replace(cfg, TMA_LOAD=True) for name, cfg in configs(*args, **kwargs).items()}

    monkeypatch.setattr(lora_block, "lora_configs", with_tma)


# dtype, rank: r·itemsize = 16 bytes, the narrowest row a TMA descriptor takes; E=6 != r, so an
# expert-major / rank-major mix-up in B cannot cancel out.
PEFT_LAYOUT_CASES = [(torch.float32, 4), (torch.float16, 8)]


@pytest.mark.parametrize("dtype, r", PEFT_LAYOUT_CASES, ids=["fp32", "fp16"])
def test_peft_layout_factors_on_tma_loads(monkeypatch, dtype, r):
    # PEFT's lora_B view is permuted (strides (1, r·E, E)); with the factors already in the
    # weights' dtype, Tensor.to returned it as is and the TMA descriptor read s·B in the wrong
    # order: 0.2 relative error in out on an H200 (bench_lora, bf16 factors).
    _tma_loads(monkeypatch)
    T, H, I, E, k = 11, 40, 24, 6, 2
    inputs = make_inputs(T, H, I, E, k, r, dtype)
    grad_out = torch.randn(T, H, dtype=dtype)
    flat = dict(zip(("up_a", "up_b"), peft_flat(inputs["up_a"], inputs["up_b"])))
    flat.update(zip(("down_a", "down_b"), peft_flat(inputs["down_a"], inputs["down_b"])))

    def run_peft(fn, cast=None):
        leaves = {n: (t.to(cast) if cast else t).clone().requires_grad_() for n, t in flat.items()}
        lora = MoeLora(LoraFactors.from_peft(leaves["up_a"], leaves["up_b"], E, 0.5),
                       LoraFactors.from_peft(leaves["down_a"], leaves["down_b"], E, 2.0))
        block = [inputs[n].to(cast) if cast and inputs[n].is_floating_point() else inputs[n]
                 for n in ("hidden", "gate_up_w", "down_w", "top_k_index", "top_k_weights")]
        out = fn(*block, lora=lora)
        return out, torch.autograd.grad(out, list(leaves.values()), grad_out.to(out.dtype))

    out, grads = run_peft(moe_experts)
    ref, ref_grads = run_peft(reference, cast=torch.float64)
    tol = TOLERANCES[dtype]
    assert relative_error(out, ref) < tol
    for name, grad, ref_grad in zip(flat, grads, ref_grads):
        assert relative_error(grad, ref_grad) < tol, name


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compiles_without_graph_breaks(dynamic):
    # The interpreter's ops are opaque (moe_tune.ops.launch): Dynamo traces the block whole through
    # the fake implementations and the registered autograd; Inductor tracing into the kernels is
    # for the GPU tests.
    torch._dynamo.reset()
    compiled = torch.compile(moe_experts, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    for T in (5, 7):
        inputs = make_inputs(T, 32, 16, 4, 2, 4, torch.float32)
        grad_out = torch.randn(T, 32)
        out, grads = run(compiled, inputs, grad_out)
        eager_out, eager_grads = run(moe_experts, inputs, grad_out)
        assert torch.equal(out, eager_out)
        for name in grads:
            assert torch.equal(grads[name], eager_grads[name]), name


@pytest.mark.parametrize("projections", [("gate_up", "down"), ("down",)], ids=["both", "down-only"])
def test_opcheck_forward_op(projections):
    inputs = make_inputs(6, 32, 16, 4, 2, 3, torch.float32)
    factors = [inputs[n].requires_grad_() if _used(n, projections) else None
               for n in ("up_a", "up_b", "down_a", "down_b")]
    inputs["hidden"].requires_grad_()
    inputs["top_k_weights"].requires_grad_()
    args = (inputs["hidden"], inputs["gate_up_w"], inputs["down_w"], inputs["top_k_index"], inputs["top_k_weights"],
            *factors)
    torch.library.opcheck(lora_ops.moe_experts_lora_fwd, args)


@pytest.mark.parametrize("needs", [(True, True, True, True, True), (False, True, False, False, True)],
                         ids=["all", "two-factors"])
def test_opcheck_backward_op(needs):
    T, H, I, E, k, r = 6, 32, 16, 4, 2, 3
    inputs = make_inputs(T, H, I, E, k, r, torch.float32)
    factors = [inputs[n] for n in ("up_a", "up_b", "down_a", "down_b")]
    out, h, l1, l2, offsets, slots = lora_ops.moe_experts_lora_fwd(
        inputs["hidden"], inputs["gate_up_w"], inputs["down_w"], inputs["top_k_index"], inputs["top_k_weights"],
        *factors)
    args = (torch.randn(T, H), inputs["hidden"], inputs["gate_up_w"], inputs["down_w"], inputs["top_k_weights"], h, l1,
            l2, offsets, slots, *factors, *needs)
    torch.library.opcheck(lora_ops.moe_experts_lora_bwd, args)


def _bad(change):
    inputs = make_inputs(4, 32, 16, 4, 2, 3, torch.float32)
    up = LoraFactors(inputs["up_a"], inputs["up_b"], 1.0)
    lora = change(inputs, up)
    return inputs, lora


# what is wrong, how to build it, a phrase the error must contain
BAD_LORA = [
    ("no-factors", lambda i, up: MoeLora(), "gate_up, down or both"),
    ("a-shape", lambda i, up: MoeLora(gate_up=LoraFactors(torch.randn(4, 3, 16), up.lora_B, 1.0)),
     "lora.gate_up.lora_A must be [E, r, K]"),
    ("b-rank", lambda i, up: MoeLora(gate_up=LoraFactors(up.lora_A, torch.randn(4, 32, 2), 1.0)),
     "lora.gate_up.lora_B must be [E, N, r]"),
    ("down-on-gate-up", lambda i, up: MoeLora(down=up), "lora.down.lora_A must be [E, r, K]"),
    ("nan-scaling", lambda i, up: MoeLora(gate_up=LoraFactors(up.lora_A, up.lora_B, float("nan"))),
     "scaling must be a finite number"),
    ("int-factor", lambda i, up: MoeLora(gate_up=LoraFactors(up.lora_A.long(), up.lora_B, 1.0)),
     "must be a floating-point tensor"),
    ("not-a-lora", lambda i, up: up, "lora must be a moe_tune.ops.lora.MoeLora"),
]


@pytest.mark.parametrize("name, change, phrase", BAD_LORA, ids=[b[0] for b in BAD_LORA])
def test_bad_lora_is_a_clear_error(name, change, phrase):
    inputs, lora = _bad(change)
    block_inputs = {n: inputs[n] for n in ("hidden", "gate_up_w", "down_w", "top_k_index", "top_k_weights")}
    with pytest.raises(InvalidInputError, match=phrase.replace("[", r"\[").replace("]", r"\]")):
        moe_experts(**block_inputs, lora=lora)


def test_trainable_base_weights_are_refused():
    # LoRA freezes W: a base weight that wants a gradient would silently get none.
    inputs = make_inputs(4, 32, 16, 4, 2, 3, torch.float32)
    lora = MoeLora(gate_up=LoraFactors(inputs["up_a"], inputs["up_b"], 1.0))
    with pytest.raises(InvalidInputError, match="base weights are frozen"):
        moe_experts(inputs["hidden"], inputs["gate_up_w"].requires_grad_(), inputs["down_w"], inputs["top_k_index"],
                    inputs["top_k_weights"], lora=lora)


def test_from_peft_rejects_mismatched_shapes():
    with pytest.raises(InvalidInputError, match="lora_B.weight must be"):
        LoraFactors.from_peft(torch.randn(6, 8), torch.randn(10, 4), 3, 1.0)
