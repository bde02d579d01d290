"""LoRA on the gpt-oss experts block (``gptoss_experts(..., lora=MoeLora(...))``,
``moe_tune.ops.gptoss_lora``) against the float64 plain-torch reference on W + ΔW, in Triton's
CPU interpreter: forward, the gradients of the factors, the hidden states, the biases and the
routing weights, LoRA on one projection only, the registered ops under ``opcheck`` and the block
under ``torch.compile(fullgraph=True)``.

Fresh random inputs and routing per case; every buffer the bodies write starts as NaN (both
modules' ``_alloc`` are poisoned), so an element a kernel forgets fails the comparison. float32
runs a limit inside the pre-activations' spread, so both sides of each clamp are hit (float32 and
float64 round H too little to move an element across a limit); float16 runs the released limit
with pre-activations well inside it, so that its one rounding of H cannot flip a clamp (the clamp
rule itself is the base block's, tested in test_gptoss.py).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from alloc_tracking import alive_at_each_dw, poison_allocations
from peft_layout import peft_flat

from gptoss_lora_cases import (ALPHA, BASE, FACTORS, TRAINABLE, UP_SCALING, DOWN_SCALING, lora_of, make_inputs,
                               moe_tune_block, reference_block, run)
from gptoss_lora_cases import assert_matches_reference as assert_matches

from moe_tune.errors import InvalidInputError
from moe_tune.ops import gptoss, gptoss_lora, lora_block
from moe_tune.ops.lora import LoraFactors
from moe_tune.reference import relative_error

pytestmark = [
    pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter tests; GPU has its own"),
    pytest.mark.filterwarnings("ignore::moe_tune.errors.CacheWarning"),
]

TOLERANCES = {torch.float16: 6e-3, torch.float32: 1e-5}
WEIGHT_GRAD_TOLERANCES = {torch.float16: 4e-3, torch.float32: 1e-5}
LIMITS = {torch.float32: 1.5, torch.float16: 7.0}
SPREADS = {torch.float32: 2.0, torch.float16: 1.0}  # std of the pre-activations (see the module doc)

# name, T, H, I, E, k, r
SHAPES = [
    ("one-token", 1, 32, 16, 4, 2, 4),  # T=1: most experts empty
    ("empty-expert", 6, 32, 16, 4, 2, 8),  # expert E-1 never routed: its factor gradients are zero
    ("rank-odd", 9, 32, 32, 5, 2, 5),  # r not a power of two: masked rank columns
    ("rank-wide", 5, 32, 16, 3, 2, 40),  # r = 40 above I and above 32: several blocks along r
    ("odd-dims", 5, 20, 12, 3, 2, 3),  # H, I not multiples of 16: masked tiles, split interleaved pairs
    ("top-1", 8, 32, 16, 4, 1, 6),  # one slot per token
]

@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    poison_allocations(monkeypatch, gptoss, gptoss_lora, lora_block)  # lora_block: the factors' GEMMs


def inputs_for(T, H, I, E, k, r, dtype):
    return make_inputs(T, H, I, E, k, r, dtype, spread=SPREADS[dtype])


def assert_matches_reference(inputs, grad_out, dtype, **kwargs):
    return assert_matches(inputs, grad_out, dtype, limit=LIMITS[dtype], tol=TOLERANCES[dtype],
                          weight_tol=WEIGHT_GRAD_TOLERANCES[dtype], **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name, T, H, I, E, k, r", SHAPES, ids=[s[0] for s in SHAPES])
def test_forward_and_gradients_match_reference(name, T, H, I, E, k, r, dtype):
    inputs = inputs_for(T, H, I, E, k, r, dtype)
    grads = assert_matches_reference(inputs, torch.randn(T, H, dtype=dtype), dtype)
    routed = set(inputs["top_k_index"].flatten().tolist())
    for e in set(range(E)) - routed:  # an expert with no rows: exact zero gradients
        for factor in FACTORS:
            assert torch.count_nonzero(grads[factor][e]) == 0, (factor, e)
        assert torch.count_nonzero(grads["gate_up_b"][e]) == 0 and torch.count_nonzero(grads["down_b"][e]) == 0


def test_clamps_hit_on_both_sides():
    """The float32 inputs do exercise the clamps: H + ΔH + b1 lands beyond ±limit for gate and up."""
    T, H, I, E, k, r = 9, 32, 32, 5, 2, 5
    inputs = inputs_for(T, H, I, E, k, r, torch.float32)
    lora = lora_of(inputs, ("gate_up",))
    w1 = inputs["gate_up_w"] + lora.gate_up.delta_weight().transpose(1, 2)
    pre = torch.cat([inputs["hidden"] @ w1[e] + inputs["gate_up_b"][e] for e in range(E)])
    limit = LIMITS[torch.float32]
    for part in (pre[:, ::2], pre[:, 1::2]):
        assert (part > limit).float().mean() > 0.1 and (part < -limit).float().mean() > 0.1


@pytest.mark.parametrize("projections", [("gate_up",), ("down",)], ids=["gate-up-only", "down-only"])
def test_lora_on_one_projection(projections):
    T, H, I, E, k, r = 7, 32, 16, 4, 2, 4
    inputs = inputs_for(T, H, I, E, k, r, torch.float32)
    assert_matches_reference(inputs, torch.randn(T, H), torch.float32, projections=projections)


def test_frozen_biases_and_factors_only():
    """PEFT's case: only the factors train (hidden, biases and routing weights need no gradient)."""
    T, H, I, E, k, r = 8, 32, 16, 4, 2, 4
    inputs = inputs_for(T, H, I, E, k, r, torch.float32)
    assert_matches_reference(inputs, torch.randn(T, H), torch.float32, trainable=FACTORS)


def test_float32_factors_on_half_weights():
    """PEFT keeps a half-precision model's adapters in float32 (autocast_adapter_dtype): the factors
    are cast to the weights' dtype and their gradients come back in float32."""
    T, H, I, E, k, r = 7, 32, 16, 4, 2, 4
    inputs = make_inputs(T, H, I, E, k, r, torch.float16, spread=SPREADS[torch.float16], factors_dtype=torch.float32)
    grads = assert_matches_reference(inputs, torch.randn(T, H, dtype=torch.float16), torch.float16)
    assert all(grads[f].dtype == torch.float32 for f in FACTORS)


@pytest.mark.parametrize("dtype, r", [(torch.float32, 4), (torch.float16, 8)], ids=["fp32", "fp16"])
def test_peft_layout_factors_on_tma_loads(monkeypatch, dtype, r):
    """PEFT's lora_B view is permuted (strides (1, r·E, E)); every pass on TMA loads (as GPU configs
    choose them) must read s·B in expert order: the factors come from PEFT's flat weights here,
    and their gradients land there. r·itemsize = 16 bytes, the narrowest row TMA takes; E != r."""
    configs = gptoss_lora.lora_configs
    monkeypatch.setattr(gptoss_lora, "lora_configs", lambda *a, **kw: {
        name: dataclasses.replace(cfg, TMA_LOAD=True) for name, cfg in configs(*a, **kw).items()})
    T, H, I, E, k = 11, 40, 24, 6, 2
    inputs = inputs_for(T, H, I, E, k, r, dtype)
    grad_out = torch.randn(T, H, dtype=dtype)
    flat = dict(zip(("up_a", "up_b"), peft_flat(inputs["up_a"], inputs["up_b"])))
    flat.update(zip(("down_a", "down_b_lora"), peft_flat(inputs["down_a"], inputs["down_b_lora"])))

    def run_peft(fn, cast=None):
        leaves = {n: (t.to(cast) if cast else t).clone().requires_grad_() for n, t in flat.items()}
        views = {"up_a": LoraFactors.from_peft(leaves["up_a"], leaves["up_b"], E, UP_SCALING),
                 "down": LoraFactors.from_peft(leaves["down_a"], leaves["down_b_lora"], E, DOWN_SCALING)}
        block = {n: inputs[n].to(cast) if cast and inputs[n].is_floating_point() else inputs[n] for n in BASE}
        block.update(up_a=views["up_a"].lora_A, up_b=views["up_a"].lora_B, down_a=views["down"].lora_A,
                     down_b_lora=views["down"].lora_B)
        out = fn(block, ("gate_up", "down"), LIMITS[dtype])
        return out, torch.autograd.grad(out, list(leaves.values()), grad_out.to(out.dtype))

    out, grads = run_peft(moe_tune_block)
    ref, ref_grads = run_peft(reference_block, cast=torch.float64)
    assert relative_error(out, ref) < TOLERANCES[dtype]
    for name, grad, ref_grad in zip(flat, grads, ref_grads):
        assert relative_error(grad, ref_grad) < TOLERANCES[dtype], name


def test_trained_base_weight_is_refused():
    T, H, I, E, k, r = 4, 32, 16, 4, 2, 4
    inputs = inputs_for(T, H, I, E, k, r, torch.float32)
    inputs["gate_up_w"].requires_grad_()
    with pytest.raises(InvalidInputError, match="frozen"):
        moe_tune_block(inputs, ("gate_up", "down"), 7.0)


def test_factor_shapes_follow_the_kn_layout():
    """A per expert [r, K] with K = the weight's dim 1 for [E, K, N] weights: an [E, N, K]-style
    factor (A over 2I) is refused with a clear message."""
    T, H, I, E, k, r = 4, 32, 24, 4, 2, 4
    inputs = inputs_for(T, H, I, E, k, r, torch.float32)
    inputs["up_a"] = torch.randn(E, r, 2 * I)
    with pytest.raises(InvalidInputError, match=r"lora.gate_up.lora_A must be \[E, r, K\] = \[4, r, 32\]"):
        moe_tune_block(inputs, ("gate_up", "down"), 7.0)


def _op_args(T, H, I, E, k, r):
    inputs = inputs_for(T, H, I, E, k, r, torch.float32)
    for name in TRAINABLE:
        inputs[name].requires_grad_()
    return (*(inputs[n] for n in BASE), inputs["up_a"], (UP_SCALING * inputs["up_b"]).detach().requires_grad_(),
            inputs["down_a"], (DOWN_SCALING * inputs["down_b_lora"]).detach().requires_grad_(), 1.5, ALPHA)


def test_opcheck():
    args = _op_args(6, 32, 16, 4, 2, 4)
    torch.library.opcheck(gptoss_lora.gptoss_experts_lora_fwd, args)


def test_compiled_matches_eager():
    """``torch.compile(fullgraph=True)`` runs the op pair (no graph break) and matches eager."""
    T, H, I, E, k, r = 7, 32, 16, 4, 2, 4
    inputs = inputs_for(T, H, I, E, k, r, torch.float32)
    grad_out = torch.randn(T, H)
    limit = LIMITS[torch.float32]
    eager_out, eager_grads = run(moe_tune_block, inputs, grad_out, ("gate_up", "down"), TRAINABLE, limit)
    torch._dynamo.reset()
    compiled = torch.compile(moe_tune_block, fullgraph=True, backend="aot_eager")
    out, grads = run(compiled, inputs, grad_out, ("gate_up", "down"), TRAINABLE, limit)
    assert torch.allclose(out, eager_out, rtol=1e-5, atol=1e-5)
    for name, grad in eager_grads.items():
        assert torch.allclose(grads[name], grad, rtol=1e-5, atol=1e-5), name


def test_eager_backward_frees_h_before_the_lora_weight_gradients(monkeypatch):
    """Eager, H (the up GEMM's [M, 2I] output, the block's largest activation) is handed to the
    backward, which frees it once the activation backward has read it: it is gone at every dW."""
    T, H, I, E, k, r = 9, 32, 24, 4, 2, 4
    inputs = inputs_for(T, H, I, E, k, r, torch.float32)
    grad_out = torch.randn(T, H)

    def h_alive(made):
        return [ref() is not None for shape, ref in made if shape == (T * k, 2 * I)]

    seen, made, _ = alive_at_each_dw(
        monkeypatch, gptoss_lora, moe_tune_block,
        lambda fn: run(fn, inputs, grad_out, ("gate_up", "down"), TRAINABLE, LIMITS[torch.float32]), h_alive,
        compiled=False)
    assert len(seen) == 4  # dB̃2, dA2, dB̃1, dA1
    assert all(not any(alive) for alive in seen)
    assert made[0][0] == (T * k, 2 * I)  # H is the body's first buffer


def test_a_second_backward_is_a_clear_error():
    T, H, I, E, k, r = 5, 32, 16, 4, 2, 4
    leaves = inputs_for(T, H, I, E, k, r, torch.float32)
    for name in FACTORS:
        leaves[name].requires_grad_()
    out = moe_tune_block(leaves, ("gate_up", "down"), LIMITS[torch.float32])
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="run the forward again"):
        out.sum().backward()
