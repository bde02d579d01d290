"""The experts block as torch.library ops: ``moe_tune::moe_experts_fwd``, whose registered autograd
runs the backward as three ops (``moe_experts_bwd_act``, ``_bwd_up``, ``_bwd_down``): the path
taken under torch.compile (``moe_tune.moe_experts`` takes it while compiling; eager calls skip the
dispatcher).

All are opaque ops (``moe_tune.ops.launch.register_op``; the backward ops, which have no gradient of
their own, ``register_backward_op``): torch.compile calls each as a black box, and nothing in a body
reads device memory on the host. The bodies are ``moe_tune.ops.block``'s
(the data flow is described there); the backward is three ops so that Inductor frees H after the
first and dH after the second.

No ``from __future__ import annotations`` here: torch.library infers op schemas from the
annotations' runtime values.
"""

import torch

from moe_tune.ops import block
from moe_tune.ops.launch import register_backward_op, register_op


def _moe_experts_fwd(
    hidden: torch.Tensor,
    gate_up_w: torch.Tensor,
    down_w: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out [T, H], H [M, 2I], expert_offsets [E+1], sorted_slots [M])."""
    assert activation in block.ACTIVATIONS, activation
    return block.forward(hidden, gate_up_w, down_w, top_k_index, top_k_weights, in_op=True)


moe_experts_fwd = register_op("moe_tune::moe_experts_fwd", _moe_experts_fwd)


def _moe_experts_bwd_act(
    grad_out: torch.Tensor,
    down_w: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_out: torch.Tensor,
    expert_offsets: torch.Tensor,
    sorted_slots: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (w·A [M, I], dH [M, 2I], d top_k_weights [T, k])."""
    return block.backward_act(grad_out, down_w, top_k_weights, gate_up_out, expert_offsets, sorted_slots,
                              in_op=True)


moe_experts_bwd_act = register_backward_op("moe_tune::moe_experts_bwd_act", _moe_experts_bwd_act)


def _moe_experts_bwd_up(
    d_gate_up_out: torch.Tensor,
    hidden: torch.Tensor,
    gate_up_w: torch.Tensor,
    expert_offsets: torch.Tensor,
    sorted_slots: torch.Tensor,
    topk: int,
    need_hidden: bool,
    need_gate_up: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (d hidden [T, H], d gate_up_w); one not asked for comes back as an empty tensor."""
    return block.backward_up(d_gate_up_out, hidden, gate_up_w, expert_offsets, sorted_slots, topk,
                             need_hidden=need_hidden, need_gate_up=need_gate_up, in_op=True)


moe_experts_bwd_up = register_backward_op("moe_tune::moe_experts_bwd_up", _moe_experts_bwd_up)


def _moe_experts_bwd_down(
    grad_out: torch.Tensor,
    weighted_act: torch.Tensor,
    down_w: torch.Tensor,
    expert_offsets: torch.Tensor,
    sorted_slots: torch.Tensor,
    topk: int,
) -> torch.Tensor:
    """Returns d down_w."""
    return block.backward_down(grad_out, weighted_act, down_w, expert_offsets, sorted_slots, topk, in_op=True)


moe_experts_bwd_down = register_backward_op("moe_tune::moe_experts_bwd_down", _moe_experts_bwd_down)


def _setup_context(ctx, inputs, output) -> None:
    hidden, gate_up_w, down_w, _top_k_index, top_k_weights, activation = inputs
    _out, gate_up_out, expert_offsets, sorted_slots = output
    ctx.mark_non_differentiable(gate_up_out, expert_offsets, sorted_slots)
    ctx.save_for_backward(hidden, gate_up_w, down_w, top_k_weights, gate_up_out, expert_offsets, sorted_slots)
    ctx.activation = activation


def _backward(ctx, grad_out, _grad_gate_up_out, _grad_offsets, _grad_slots):
    hidden, gate_up_w, down_w, top_k_weights, gate_up_out, offsets, slots = ctx.saved_tensors
    need_hidden, need_gate_up, need_down, _, need_weights, _ = ctx.needs_input_grad
    topk = top_k_weights.shape[1]
    weighted_act, d_gate_up_out, d_weights = moe_experts_bwd_act(grad_out, down_w, top_k_weights, gate_up_out,
                                                                 offsets, slots)
    d_hidden = d_gate_up = d_down = None
    if need_hidden or need_gate_up:
        d_hidden, d_gate_up = moe_experts_bwd_up(d_gate_up_out, hidden, gate_up_w, offsets, slots, topk,
                                                 need_hidden, need_gate_up)
    if need_down:
        d_down = moe_experts_bwd_down(grad_out, weighted_act, down_w, offsets, slots, topk)
    return (
        d_hidden if need_hidden else None,
        d_gate_up if need_gate_up else None,
        d_down,
        None,
        d_weights if need_weights else None,
        None,
    )


moe_experts_fwd.register_autograd(_backward, setup_context=_setup_context)
