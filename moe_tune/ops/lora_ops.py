"""The experts block with LoRA as two torch.library ops, ``moe_tune::moe_experts_lora_fwd`` and
``moe_tune::moe_experts_lora_bwd``, tied together by ``register_autograd``: the path
torch.compile traces (``moe_tune.ops.lora.moe_experts_lora`` takes it while compiling).

Registered like ``moe_tune.ops.custom_ops`` (opaque ops, ``moe_tune.ops.launch.register_op``); the
bodies are ``moe_tune.ops.lora_block.forward`` and ``backward``. A projection without LoRA passes
None for its factors.

No ``from __future__ import annotations`` here: torch.library infers op schemas from the
annotations' runtime values.
"""

from typing import Optional

import torch

from moe_tune.ops import lora_block
from moe_tune.ops.launch import register_backward_op, register_op

def _moe_experts_lora_fwd(
    hidden: torch.Tensor,
    gate_up_w: torch.Tensor,
    down_w: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    up_a: Optional[torch.Tensor],
    up_b: Optional[torch.Tensor],
    down_a: Optional[torch.Tensor],
    down_b: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out [T, H], H [M, 2I], L1 [M, r1], L2 [M, r2], expert_offsets [E+1], sorted_slots [M])."""
    return lora_block.forward(hidden, gate_up_w, down_w, top_k_index, top_k_weights, up_a, up_b, down_a, down_b,
                              in_op=True)


moe_experts_lora_fwd = register_op("moe_tune::moe_experts_lora_fwd", _moe_experts_lora_fwd)


def _moe_experts_lora_bwd(
    grad_out: torch.Tensor,
    hidden: torch.Tensor,
    gate_up_w: torch.Tensor,
    down_w: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_out: torch.Tensor,
    l1: torch.Tensor,
    l2: torch.Tensor,
    expert_offsets: torch.Tensor,
    sorted_slots: torch.Tensor,
    up_a: Optional[torch.Tensor],
    up_b: Optional[torch.Tensor],
    down_a: Optional[torch.Tensor],
    down_b: Optional[torch.Tensor],
    need_hidden: bool,
    need_up_a: bool,
    need_up_b: bool,
    need_down_a: bool,
    need_down_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (d hidden [T, H], d up_a, d up_b, d down_a, d down_b, d top_k_weights [T, k]); a
    gradient not asked for comes back as an empty tensor."""
    return lora_block.backward(grad_out, hidden, gate_up_w, down_w, top_k_weights, gate_up_out, l1, l2,
                               expert_offsets, sorted_slots, up_a, up_b, down_a, down_b, need_hidden=need_hidden,
                               need_up_a=need_up_a, need_up_b=need_up_b, need_down_a=need_down_a,
                               need_down_b=need_down_b, in_op=True)


moe_experts_lora_bwd = register_backward_op("moe_tune::moe_experts_lora_bwd", _moe_experts_lora_bwd)


def _setup_context(ctx, inputs, output) -> None:
    hidden, gate_up_w, down_w, _top_k_index, top_k_weights, up_a, up_b, down_a, down_b = inputs
    _out, gate_up_out, l1, l2, expert_offsets, sorted_slots = output
    ctx.mark_non_differentiable(gate_up_out, l1, l2, expert_offsets, sorted_slots)
    # X is read again only by dA1: without LoRA on gate_up an empty stand-in saves pinning it.
    kept_hidden = hidden if up_a is not None else hidden.new_empty(0)
    ctx.save_for_backward(kept_hidden, gate_up_w, down_w, top_k_weights, gate_up_out, l1, l2, expert_offsets,
                          sorted_slots, up_a, up_b, down_a, down_b)


def _backward(ctx, grad_out, _grad_gate_up_out, _grad_l1, _grad_l2, _grad_offsets, _grad_slots):
    saved = ctx.saved_tensors
    need_hidden, _, _, _, need_weights, need_up_a, need_up_b, need_down_a, need_down_b = ctx.needs_input_grad
    d_hidden, d_up_a, d_up_b, d_down_a, d_down_b, d_weights = moe_experts_lora_bwd(
        grad_out, *saved, need_hidden, need_up_a, need_up_b, need_down_a, need_down_b,
    )
    return (
        d_hidden if need_hidden else None,
        None,
        None,
        None,
        d_weights if need_weights else None,
        d_up_a if need_up_a else None,
        d_up_b if need_up_b else None,
        d_down_a if need_down_a else None,
        d_down_b if need_down_b else None,
    )


moe_experts_lora_fwd.register_autograd(_backward, setup_context=_setup_context)
