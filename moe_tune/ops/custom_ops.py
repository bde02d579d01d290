"""The experts block as two torch.library ops, ``moe_tune::moe_experts_fwd`` and
``moe_tune::moe_experts_bwd``, tied together by ``register_autograd``: the path torch.compile
traces (``moe_tune.moe_experts`` takes it while compiling; eager calls skip the dispatcher).

Both are ``triton_op``s (see ``moe_tune.ops.launch``): torch.compile sees one custom op per pass,
Inductor traces into its body and compiles the Triton kernels in the graph, and nothing in a body
reads device memory on the host. The bodies are ``moe_tune.ops.block.forward`` and ``backward``
(the data flow is described there).

No ``from __future__ import annotations`` here: torch.library infers op schemas from the
annotations' runtime values.
"""

import torch

from moe_tune.kernels.grouped_mm import grouped_mm_dw_kernel, grouped_mm_kernel
from moe_tune.kernels.routing import routing_kernel
from moe_tune.kernels.swiglu import swiglu_backward_kernel, swiglu_forward_kernel
from moe_tune.ops import block
from moe_tune.ops.launch import register_op

_KERNELS = (grouped_mm_kernel, grouped_mm_dw_kernel, routing_kernel, swiglu_forward_kernel, swiglu_backward_kernel)


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
    return block.forward(hidden, gate_up_w, down_w, top_k_index, top_k_weights, traced=True)


moe_experts_fwd = register_op("moe_tune::moe_experts_fwd", _moe_experts_fwd, _KERNELS)


def _moe_experts_bwd(
    grad_out: torch.Tensor,
    hidden: torch.Tensor,
    gate_up_w: torch.Tensor,
    down_w: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_out: torch.Tensor,
    expert_offsets: torch.Tensor,
    sorted_slots: torch.Tensor,
    activation: str,
    need_hidden: bool,
    need_gate_up: bool,
    need_down: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (d hidden [T, H], d gate_up_w, d down_w, d top_k_weights [T, k]); a gradient not
    asked for comes back as an empty tensor."""
    assert activation in block.ACTIVATIONS, activation
    return block.backward(grad_out, hidden, gate_up_w, down_w, top_k_weights, gate_up_out, expert_offsets,
                          sorted_slots, need_hidden=need_hidden, need_gate_up=need_gate_up, need_down=need_down,
                          traced=True)


moe_experts_bwd = register_op("moe_tune::moe_experts_bwd", _moe_experts_bwd, _KERNELS)


def _setup_context(ctx, inputs, output) -> None:
    hidden, gate_up_w, down_w, _top_k_index, top_k_weights, activation = inputs
    _out, gate_up_out, expert_offsets, sorted_slots = output
    ctx.mark_non_differentiable(gate_up_out, expert_offsets, sorted_slots)
    ctx.save_for_backward(hidden, gate_up_w, down_w, top_k_weights, gate_up_out, expert_offsets, sorted_slots)
    ctx.activation = activation


def _backward(ctx, grad_out, _grad_gate_up_out, _grad_offsets, _grad_slots):
    saved = ctx.saved_tensors
    need_hidden, need_gate_up, need_down, _, need_weights, _ = ctx.needs_input_grad
    d_hidden, d_gate_up, d_down, d_weights = moe_experts_bwd(
        grad_out, *saved, ctx.activation, need_hidden, need_gate_up, need_down,
    )
    return (
        d_hidden if need_hidden else None,
        d_gate_up if need_gate_up else None,
        d_down if need_down else None,
        None,
        d_weights if need_weights else None,
        None,
    )


moe_experts_fwd.register_autograd(_backward, setup_context=_setup_context)
