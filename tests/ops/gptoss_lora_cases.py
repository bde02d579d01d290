"""The gpt-oss LoRA block's test cases, shared by the interpreter tests (test_gptoss_lora.py) and the
GPU tests (test_gptoss_lora_gpu.py): inputs, the block and its float64 reference on W + ΔW, and the
comparison of the output and every gradient."""

from __future__ import annotations

import torch

from moe_tune.ops.gptoss_lora import gptoss_experts_lora
from moe_tune.ops.lora import LoraFactors, MoeLora
from moe_tune.reference import relative_error
from moe_tune.reference.gptoss import reference_gptoss_experts, routing_weight_grad_scale

ALPHA = 1.702
UP_SCALING, DOWN_SCALING = 0.5, 2.0
BASE = ("hidden", "gate_up_w", "gate_up_b", "down_w", "down_b", "top_k_index", "top_k_weights")
FACTORS = ("up_a", "up_b", "down_a", "down_b_lora")
TRAINABLE = ("hidden", "gate_up_b", "down_b", "top_k_weights") + FACTORS


def make_inputs(T, H, I, E, k, r, dtype, *, spread: float = 1.0, device="cpu", factors_dtype=None):
    """Fresh random inputs; ``spread`` is about the std of the pre-activations H + b1."""
    experts = E - 1 if k < E else E
    d = dict(device=device)
    fdt = factors_dtype or dtype
    return dict(
        hidden=torch.randn(T, H, **d).to(dtype),
        gate_up_w=(spread * torch.randn(E, H, 2 * I, **d) / H**0.5).to(dtype),
        gate_up_b=(0.5 * torch.randn(E, 2 * I, **d)).to(dtype),
        down_w=(torch.randn(E, I, H, **d) / I**0.5).to(dtype),
        down_b=torch.randn(E, H, **d).to(dtype),
        top_k_index=torch.topk(torch.randn(T, experts, **d), k, dim=-1).indices,
        top_k_weights=torch.rand(T, k, **d).to(dtype),
        # B as large as A: PEFT starts B at zero, which would hide every B-side mistake.
        up_a=(torch.randn(E, r, H, **d) / H**0.5).to(fdt),
        up_b=(torch.randn(E, 2 * I, r, **d) / r**0.5).to(fdt),
        down_a=(torch.randn(E, r, I, **d) / I**0.5).to(fdt),
        down_b_lora=(torch.randn(E, H, r, **d) / r**0.5).to(fdt),
    )


def lora_of(leaves, projections):
    up = LoraFactors(leaves["up_a"], leaves["up_b"], UP_SCALING) if "gate_up" in projections else None
    down = LoraFactors(leaves["down_a"], leaves["down_b_lora"], DOWN_SCALING) if "down" in projections else None
    return MoeLora(gate_up=up, down=down)


def _used(name, projections):
    if name in ("up_a", "up_b"):
        return "gate_up" in projections
    if name in ("down_a", "down_b_lora"):
        return "down" in projections
    return True


def moe_tune_block(leaves, projections, limit):
    return gptoss_experts_lora(*(leaves[n] for n in BASE), lora=lora_of(leaves, projections), limit=limit, alpha=ALPHA)


def reference_block(leaves, projections, limit):
    """W + ΔW in float64, ΔW[e] = s·(B·A)ᵀ in the weights' [E, K, N] layout, as PEFT folds it."""
    lora = lora_of(leaves, projections)
    w1, w2 = leaves["gate_up_w"], leaves["down_w"]
    if lora.gate_up is not None:
        w1 = w1 + lora.gate_up.delta_weight().transpose(1, 2)
    if lora.down is not None:
        w2 = w2 + lora.down.delta_weight().transpose(1, 2)
    return reference_gptoss_experts(leaves["hidden"], w1, leaves["gate_up_b"], w2, leaves["down_b"],
                                    leaves["top_k_index"], leaves["top_k_weights"], limit=limit, alpha=ALPHA)


def run(fn, inputs, grad_out, projections, trainable, limit, cast=None):
    leaves = {n: (t.to(cast) if cast and t.is_floating_point() else t).clone() for n, t in inputs.items()}
    for n in trainable:
        leaves[n].requires_grad_()
    out = fn(leaves, projections, limit)
    wanted = [n for n in trainable if _used(n, projections)]
    grads = torch.autograd.grad(out, [leaves[n] for n in wanted], grad_out.to(out.dtype))
    return out, dict(zip(wanted, grads))


def assert_matches_reference(inputs, grad_out, dtype, *, limit, tol, weight_tol, projections=("gate_up", "down"),
                             trainable=TRAINABLE, fn=moe_tune_block):
    """The block's output and gradients against the float64 reference: ``tol`` relative error
    (norm-wise), the routing weights' gradient ``weight_tol`` per slot against the sum of its
    terms' magnitudes. Returns the gradients."""
    out, grads = run(fn, inputs, grad_out, projections, trainable, limit)
    ref, ref_grads = run(reference_block, inputs, grad_out.double(), projections, trainable, limit,
                         cast=torch.float64)
    assert out.dtype == dtype and out.shape == inputs["hidden"].shape
    assert relative_error(out, ref) < tol
    assert set(grads) == set(ref_grads)
    for name, grad in grads.items():
        assert grad.dtype == inputs[name].dtype and torch.isfinite(grad).all(), name
        if name == "top_k_weights":
            double = {n: t.double() if t.is_floating_point() else t for n, t in inputs.items()}
            lora = lora_of(double, projections)
            w1 = double["gate_up_w"] + (lora.gate_up.delta_weight().transpose(1, 2) if lora.gate_up else 0)
            w2 = double["down_w"] + (lora.down.delta_weight().transpose(1, 2) if lora.down else 0)
            scale = routing_weight_grad_scale(double["hidden"], w1, double["gate_up_b"], w2, double["down_b"],
                                              inputs["top_k_index"], grad_out, limit=limit, alpha=ALPHA)
            worst = ((grad.double() - ref_grads[name]).abs() / scale.clamp_min(1e-30)).max().item()
            assert worst < weight_tol, name
        else:
            assert relative_error(grad, ref_grads[name]) < tol, name
    return grads
