"""``moe_experts``: the whole experts block of an MoE layer, forward and backward, on moe-tune's
kernels.

Checks the caller's tensors (shapes, dtypes, devices: metadata only, nothing read from the device),
then takes one of two paths to the same bodies (``moe_tune.ops.block``, where the data flow is):

* eager: a ``torch.autograd.Function`` that launches the kernels directly — no dispatcher, so a
  training step at a few thousand tokens is not bound by host time; at a few hundred tokens, with
  ``MOE_TUNE_CUDA_GRAPHS=1``, the same bodies replayed as CUDA graphs (``moe_tune.ops.graphs``);
* under torch.compile: the ``moe_tune::moe_experts_fwd`` op, whose registered autograd runs the
  backward ops (``moe_tune.ops.custom_ops``), so ``fullgraph=True`` holds.
"""

from __future__ import annotations

import torch

from moe_tune.errors import InvalidInputError
from moe_tune.ops import block, custom_ops, graphs
from moe_tune.ops.routing import check_routing_args
from moe_tune.ops.lora import MoeLora, moe_experts_lora

_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _fail(message: str) -> None:
    raise InvalidInputError(message)


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def _check(hidden, gate_up_w, down_w, top_k_index, top_k_weights, activation) -> None:
    for name, t in (("hidden", hidden), ("gate_up_w", gate_up_w), ("down_w", down_w),
                    ("top_k_index", top_k_index), ("top_k_weights", top_k_weights)):
        if not isinstance(t, torch.Tensor):
            _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if activation not in block.ACTIVATIONS:
        _fail(f"activation must be one of {', '.join(block.ACTIVATIONS)}, got {activation!r}")
    if hidden.dim() != 2:
        _fail(f"hidden must be [T, H], got shape {_shape(hidden)}")
    if gate_up_w.dim() != 3 or down_w.dim() != 3:
        _fail(f"gate_up_w must be [E, 2I, H] and down_w [E, H, I], got {_shape(gate_up_w)} and {_shape(down_w)}")
    T, H = hidden.shape
    E, two_i, h_w = gate_up_w.shape
    if h_w != H or two_i % 2:
        _fail(f"gate_up_w must be [E, 2I, H] with H={H}, got {_shape(gate_up_w)}")
    I = two_i // 2
    if tuple(down_w.shape) != (E, H, I):
        _fail(f"down_w must be [E, H, I] = {[E, H, I]}, got {_shape(down_w)}")
    check_routing_args(top_k_index, top_k_weights, T, E)
    if top_k_weights.dtype not in _FLOAT_DTYPES:
        _fail(f"top_k_weights must be bfloat16, float16 or float32, got {top_k_weights.dtype}")
    if hidden.dtype not in _FLOAT_DTYPES:
        _fail(f"hidden must be bfloat16, float16 or float32, got {hidden.dtype}")
    if gate_up_w.dtype != hidden.dtype or down_w.dtype != hidden.dtype:
        _fail(f"hidden, gate_up_w and down_w must share a dtype, got {hidden.dtype}, {gate_up_w.dtype}, "
              f"{down_w.dtype} (cast the activations to the weights' dtype first)")
    for name, t in (("gate_up_w", gate_up_w), ("down_w", down_w), ("top_k_index", top_k_index),
                    ("top_k_weights", top_k_weights)):
        if t.device != hidden.device:
            _fail(f"{name} is on {t.device} but hidden is on {hidden.device}")


def moe_experts(
    hidden: torch.Tensor,
    gate_up_w: torch.Tensor,
    down_w: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    *,
    activation: str = "silu",
    lora: MoeLora | None = None,
) -> torch.Tensor:
    """``out[t] = Σ_j top_k_weights[t, j] · down_e(silu(gate_e(x_t)) · up_e(x_t))``, e = top_k_index[t, j].

    Args:
        hidden: ``[T, H]`` token activations.
        gate_up_w: ``[E, 2I, H]``; rows ``[0, I)`` are the gate projection, ``[I, 2I)`` the up
            projection (transformers v5's concatenated layout, ``y = x·Wᵀ``).
        down_w: ``[E, H, I]``.
        top_k_index: ``[T, k]`` expert ids (int32 or int64), each in ``[0, E)``.
        top_k_weights: ``[T, k]`` routing weights; differentiable.
        activation: ``"silu"`` (SwiGLU), the only one supported so far.
        lora: LoRA factors on the frozen weights (``moe_tune.ops.lora``): the block adds
            ``scaling·(x·Aᵀ)·Bᵀ`` per expert without building W + ΔW; gradients flow to the
            factors, ``hidden`` and ``top_k_weights``, none to the weights.

    Returns ``[T, H]`` in ``hidden``'s dtype. Gradients flow to ``hidden``, both weights and
    ``top_k_weights``. Every GEMM takes its config from the runtime loader (``moe_tune.runtime``).
    """
    _check(hidden, gate_up_w, down_w, top_k_index, top_k_weights, activation)
    args = (hidden.contiguous(), gate_up_w.contiguous(), down_w.contiguous(), top_k_index.contiguous(),
            top_k_weights.contiguous())
    if lora is not None:
        return moe_experts_lora(*args, lora)
    if torch.compiler.is_compiling():
        return custom_ops.moe_experts_fwd(*args, activation)[0]
    graphed = graphs.experts_block(*args)  # None unless CUDA graphs are on and apply (moe_tune.ops.graphs)
    return graphed if graphed is not None else _EagerBlock.apply(*args)


class _EagerBlock(torch.autograd.Function):
    """The block outside torch.compile: the bodies run as plain Python, kernels launched directly.
    H, the largest activation, is handed over to the backward (``block.hand_over``) rather than
    saved, so the backward frees it as soon as the SwiGLU backward has read it; under saved-tensor
    hooks (non-reentrant checkpointing, offloading) it is saved like the rest."""

    @staticmethod
    def forward(ctx, hidden, gate_up_w, down_w, top_k_index, top_k_weights):
        out, h, offsets, slots = block.forward(hidden, gate_up_w, down_w, top_k_index, top_k_weights, in_op=False)
        ctx.handed = block.hands_over()
        ctx.save_for_backward(hidden, gate_up_w, down_w, top_k_weights, offsets, slots, *(() if ctx.handed else (h,)))
        ctx.h = block.hand_over(h) if ctx.handed else None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        need_hidden, need_gate_up, need_down, _, need_weights = ctx.needs_input_grad
        hidden, gate_up_w, down_w, top_k_weights, offsets, slots, *saved_h = ctx.saved_tensors
        d_hidden, d_gate_up, d_down, d_weights = block.backward(
            grad_out, hidden, gate_up_w, down_w, top_k_weights, block.claim(ctx, "h") if ctx.handed else saved_h[0],
            offsets, slots, need_hidden=need_hidden, need_gate_up=need_gate_up, need_down=need_down)
        return (d_hidden if need_hidden else None, d_gate_up if need_gate_up else None,
                d_down if need_down else None, None, d_weights if need_weights else None)
