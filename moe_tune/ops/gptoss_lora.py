"""The gpt-oss experts block with LoRA on its frozen weights: ``gptoss_experts_lora(..., lora=MoeLora(...))``.

The base block is ``moe_tune.ops.gptoss`` (weights stored [E, K, N], biases, interleaved clamped
SwiGLU); the LoRA terms are those of ``moe_tune.ops.lora_block``. PEFT's factors of an [E, K, N]
expert parameter have the same per-expert shapes as those of an [E, N, K] one (``ParamWrapper.
get_delta_factors``: ΔW[e] = s·(B[e]·A[e])ᵀ), so ``LoraFactors.from_peft`` serves both layouts and
y = x·W[e] + (x·A[e]ᵀ)·B̃[e]ᵀ with B̃ = s·B (scaling folded by the caller). No base dW runs and
W + ΔW never exists: PEFT and transformers' grouped_mm fold W + ΔW for the whole stack every step
and keep it for the backward, then make the full dW to reduce it to the factors' gradients.

Every product is one grouped-GEMM launch whose problem is in
``MoeShape(layout="gpt_oss").lora_problems(r)`` (key in brackets); T tokens, k slots, M = T·k
expert-ordered rows, w the routing weights, G = d out [T, H]:

forward
    H [M, 2I]   = X[slot // k]·W1[e]                    [up.forward], W1 as stored
    L1 [M, r]   = X[slot // k]·A1ᵀ                      [up_a.forward]   (kept for dB̃1)
    H          += L1·B̃1ᵀ; A = act(H + b1[e])             [up_b.forward] + the activation kernel
    Y [M, H]    = w·A·W2[e]                             [down.forward], W2 as stored, slot order
    L2 [M, r]   = A·A2ᵀ                                 [down_a.forward] (kept for dB̃2)
    Y2 [M, H]   = w·L2·B̃2ᵀ                               [down_b.forward], slot order
    out[t]      = Σ_j (Y + Y2 + w·b2[e])[t·k + j]       the combine kernel
backward
    P [M, r]    = G[slot // k]·B̃2                       [down_b.dx]
    dA_lora     = w·P·A2                                [down_a.dx]
    dA_raw      = G[slot // k]·W2[e]ᵀ                   [down.dx]
    dH, w·A, db1, db2, dS                               ``gptoss_bwd_kernel`` with dA = w·dA_raw +
                                                        dA_lora; dS = ⟨dA_raw, A⟩ + ⟨P, L2⟩ + ⟨G, b2⟩
    dB̃2[e]      = (w·G)_eᵀ·L2_e                          [down_b.dw]
    dA2[e]      = P_eᵀ·(w·A)_e                          [down_a.dw]
    Q [M, r]    = dH·B̃1                                 [up_b.dx]
    dB̃1[e]      = dH_eᵀ·L1_e                             [up_b.dw]
    dA1[e]      = Q_eᵀ·X[slot // k]_e                   [up_a.dw]
    dX          = Σ_j (dH·W1[e]ᵀ + Q·A1)[t·k + j]       [up.dx], [up_a.dx]

A projection without LoRA runs its base GEMM alone. The biases may train (their gradients come
out of the backward kernel as in the base block); the weights may not. Saved for the backward: X
(when the gate_up projection has LoRA), H, L1, L2 and the routing. Nothing reads device memory on
the host.

No ``from __future__ import annotations``: torch.library infers the ops' schemas from the
annotations' runtime values.
"""

import functools
from typing import Optional

import torch

from moe_tune.device import DeviceInfo, query_device
from moe_tune.ops import gptoss, launch, lora_block
from moe_tune.ops.block import claim, configs_for, hand_over, hands_over, size_hint, take
from moe_tune.ops.lora import MoeLora, check_lora, prepared
from moe_tune.ops.routing import Routing, build_routing
from moe_tune.ops.rows import slot_sum
from moe_tune.problem import KernelConfig, MoeShape, Problem


def _alloc(shape, dtype, device) -> torch.Tensor:
    """Every buffer a body writes through a GEMM comes from here (the tests poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _empty(like: torch.Tensor) -> torch.Tensor:
    # Op outputs may not be None or alias an input: an absent result is a fresh empty tensor.
    return like.new_empty(0)


def _rank(factor_a) -> int:
    return int(factor_a.shape[1]) if factor_a is not None else 0


@functools.lru_cache(maxsize=256)
def _problems(E: int, H: int, I: int, topk: int, dtype: str, up_rank: int, down_rank: int) -> dict[str, Problem]:
    """The base and factor problems the block launches (a projection without LoRA: its base ones)."""
    shape = MoeShape(E, H, I, topk, layout="gpt_oss")
    lora = shape.lora_problems(max(up_rank, down_rank, 1), dtype)
    problems = {name: lora[name] for name in ("up.forward", "up.dx", "down.forward", "down.dx")}
    for prefix, rank in (("up", up_rank), ("down", down_rank)):
        if rank:
            problems.update({n: p for n, p in shape.lora_problems(rank, dtype).items() if n.startswith(prefix + "_")})
    return problems


def lora_configs(E: int, H: int, I: int, topk: int, dtype: torch.dtype, up_rank: int, down_rank: int,
                 num_tokens: int, info: DeviceInfo) -> dict[str, KernelConfig]:
    """``{"<matrix>.<pass>": KernelConfig}`` from the runtime loader for the launches of the block
    (``block.configs_for``: a dict hit when warm)."""
    return configs_for(_problems, E, H, I, topk, dtype, num_tokens, info, up_rank, down_rank)


# -------------------------------------------------------------------------------------------------
# Bodies
# -------------------------------------------------------------------------------------------------


def forward(hidden, gate_up_w, gate_up_bias, down_w, down_bias, top_k_index, top_k_weights, up_a, up_b, down_a,
            down_b, *, limit: float, alpha: float, in_op: bool):
    """``up_a`` [E, r1, H], ``up_b`` [E, 2I, r1] (scaled), ``down_a`` [E, r2, I], ``down_b``
    [E, H, r2] (scaled), contiguous, in the weights' dtype; None where a projection has no LoRA.
    Returns (out [T, H], H [M, 2I] without bias, L1 [M, r1], L2 [M, r2], expert_offsets,
    sorted_slots), L1/L2 empty without LoRA."""
    E, H, I, k = gptoss.problem_dims(gate_up_w, top_k_index.shape[1])
    T = hidden.shape[0]
    M = T * k
    device, dtype = hidden.device, hidden.dtype
    info = query_device(device)
    cfg = lora_configs(E, H, I, k, dtype, _rank(up_a), _rank(down_a), size_hint(T), info)
    routing = build_routing(top_k_index, E, in_op=in_op)
    weights = top_k_weights.reshape(M)
    flat_index = top_k_index.reshape(M)

    # -- Up: base H, its LoRA part added by the activation kernel ----------------------------------
    h = _alloc((M, 2 * I), dtype, device)
    launch.grouped_mm(hidden, gate_up_w, h, routing, None, trans_w=True, gather_a=True, gather_div=k,
                      scatter_c=False, cfg=cfg["up.forward"], info=info, in_op=in_op)
    l1 = delta = None
    if up_a is not None:
        l1, delta = lora_block.up_delta(hidden, up_a, up_b, routing, cfg, info, in_op=in_op)
    act = _alloc((M, I), dtype, device)
    gptoss.activation(h, gate_up_bias, act, routing.sorted_slots, flat_index, limit=limit, alpha=alpha,
                      delta=delta, in_op=in_op)
    del delta

    # -- Down: base and LoRA rows in slot order, summed with the bias by one combine ---------------
    down_out = _alloc((M, H), dtype, device)
    launch.grouped_mm(act, down_w, down_out, routing, weights, trans_w=True, gather_a=False, gather_div=1,
                      scatter_c=True, cfg=cfg["down.forward"], info=info, in_op=in_op)
    l2 = extra = None
    if down_a is not None:
        extra = _alloc((M, H), dtype, device)
        l2 = lora_block.down_rows(act, down_a, down_b, weights, extra, routing, cfg, info, in_op=in_op)
    out = gptoss.combine(down_out, down_bias, weights, flat_index, T, k, extra=extra, in_op=in_op)
    return (out, h, l1 if l1 is not None else _empty(hidden), l2 if l2 is not None else _empty(hidden),
            routing.expert_offsets, routing.sorted_slots)


def backward(grad_out, hidden, gate_up_w, gate_up_bias, down_w, down_bias, top_k_weights, h, l1, l2, expert_offsets,
             sorted_slots, up_a, up_b, down_a, down_b, *, limit: float, alpha: float, need_hidden: bool,
             need_gate_up_bias: bool, need_down_bias: bool, need_weights: bool, need_up_a: bool, need_up_b: bool,
             need_down_a: bool, need_down_b: bool, in_op: bool):
    """Returns (d hidden [T, H], d gate_up_bias, d down_bias, d top_k_weights [T, k], d up_a,
    d up_b, d down_a, d down_b); a gradient not asked for comes back as an empty tensor.
    ``hidden`` may be empty when up_a is None (only dA1 reads it). ``h``: the forward's H, or a
    ``block.hand_over`` list holding it (then freed once the activation backward has read it)."""
    E, H, I, k = gptoss.problem_dims(gate_up_w, top_k_weights.shape[1])
    T = grad_out.shape[0]
    M = T * k
    device, dtype = grad_out.device, gate_up_w.dtype
    info = query_device(device)
    cfg = lora_configs(E, H, I, k, dtype, _rank(up_a), _rank(down_a), size_hint(T), info)
    routing = Routing(expert_offsets, sorted_slots, T, k)
    grad_out = grad_out.contiguous()
    weights = top_k_weights.reshape(M)
    d_down_a, d_down_b = _empty(grad_out), _empty(grad_out)
    h = take(h)

    # -- Down: the LoRA's P and dA_lora, dA_raw, then the activation backward ----------------------
    lora_terms = None
    if down_a is not None:
        p, d_act_lora = lora_block.down_dx(grad_out, down_a, down_b, weights, routing, cfg, info, in_op=in_op)
        lora_terms = (d_act_lora, p, l2)
    d_act = _alloc((M, I), dtype, device)
    launch.grouped_mm(grad_out, down_w, d_act, routing, None, trans_w=False, gather_a=True, gather_div=k,
                      scatter_c=False, cfg=cfg["down.dx"], info=info, in_op=in_op)
    d_h, weighted_act, d_gate_up_bias, d_down_bias, d_weights = gptoss.activation_backward(
        d_act, h, gate_up_bias, grad_out, down_bias, top_k_weights, expert_offsets, sorted_slots, limit=limit,
        alpha=alpha, need_down_b=need_down_bias, need_weights=need_weights, lora=lora_terms, in_op=in_op)
    del d_act, lora_terms, h
    if down_a is not None:
        d_down_a, d_down_b = lora_block.down_dw(grad_out, p, l2, weighted_act, down_a, down_b, weights, routing, cfg,
                                                info, need_down_a=need_down_a, need_down_b=need_down_b, in_op=in_op)
        del p, d_act_lora
    del weighted_act

    # -- Up: Q = dH·B̃1, the LoRA gradients, then dX ------------------------------------------------
    q, d_up_a, d_up_b = None, _empty(grad_out), _empty(grad_out)
    if up_a is not None:
        q, d_up_a, d_up_b = lora_block.up_backward(d_h, hidden, l1, up_a, up_b, routing, cfg, info, need_q=need_hidden,
                                                   need_up_a=need_up_a, need_up_b=need_up_b, in_op=in_op)
    d_hidden = _empty(grad_out)
    if need_hidden:
        rows = _alloc((M, H), dtype, device)
        launch.grouped_mm(d_h, gate_up_w, rows, routing, None, trans_w=False, gather_a=False, gather_div=1,
                          scatter_c=True, cfg=cfg["up.dx"], info=info, in_op=in_op)
        del d_h
        d_hidden = slot_sum(rows, k, _alloc((T, H), dtype, device), in_op=in_op)
        if q is not None:
            lora_block.up_a_dx_rows(q, up_a, rows, routing, cfg, info, in_op=in_op)
            slot_sum(rows, k, d_hidden, accumulate=True, in_op=in_op)
    return (d_hidden, d_gate_up_bias if need_gate_up_bias else _empty(grad_out),
            d_down_bias if need_down_bias else _empty(grad_out), d_weights, d_up_a, d_up_b, d_down_a, d_down_b)


# -------------------------------------------------------------------------------------------------
# torch.library ops (the torch.compile path)
# -------------------------------------------------------------------------------------------------


def _gptoss_experts_lora_fwd(
    hidden: torch.Tensor,
    gate_up_w: torch.Tensor,
    gate_up_bias: torch.Tensor,
    down_w: torch.Tensor,
    down_bias: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    up_a: Optional[torch.Tensor],
    up_b: Optional[torch.Tensor],
    down_a: Optional[torch.Tensor],
    down_b: Optional[torch.Tensor],
    limit: float,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out [T, H], H [M, 2I], L1 [M, r1], L2 [M, r2], expert_offsets [E+1], sorted_slots [M])."""
    return forward(hidden, gate_up_w, gate_up_bias, down_w, down_bias, top_k_index, top_k_weights, up_a, up_b,
                   down_a, down_b, limit=limit, alpha=alpha, in_op=True)


gptoss_experts_lora_fwd = launch.register_op("moe_tune::gptoss_experts_lora_fwd", _gptoss_experts_lora_fwd)


def _gptoss_experts_lora_bwd(
    grad_out: torch.Tensor,
    hidden: torch.Tensor,
    gate_up_w: torch.Tensor,
    gate_up_bias: torch.Tensor,
    down_w: torch.Tensor,
    down_bias: torch.Tensor,
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
    limit: float,
    alpha: float,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    """``needs``: (hidden, gate_up_bias, down_bias, top_k_weights, up_a, up_b, down_a, down_b).
    Returns their gradients in that order; one not asked for comes back as an empty tensor."""
    return backward(grad_out, hidden, gate_up_w, gate_up_bias, down_w, down_bias, top_k_weights, gate_up_out, l1, l2,
                    expert_offsets, sorted_slots, up_a, up_b, down_a, down_b, limit=limit, alpha=alpha,
                    in_op=True, **dict(zip(_NEED_NAMES, needs)))


gptoss_experts_lora_bwd = launch.register_backward_op("moe_tune::gptoss_experts_lora_bwd",
                                                          _gptoss_experts_lora_bwd)

# The differentiable inputs of the forward (op and eager Function), by position, and their
# ``backward`` keywords, in the order ``backward`` returns their gradients.
_GRAD_POSITIONS = (0, 2, 4, 6, 7, 8, 9, 10)
_NEED_NAMES = ("need_hidden", "need_gate_up_bias", "need_down_bias", "need_weights", "need_up_a", "need_up_b",
               "need_down_a", "need_down_b")


_SAVED_H = 6  # H's position among the eager Function's saved tensors (backward's arguments after grad_out)


def _needs(needs_input_grad) -> list[bool]:
    return [bool(needs_input_grad[i]) for i in _GRAD_POSITIONS]


def _input_grads(needs_input_grad, grads) -> tuple:
    out = [None] * len(needs_input_grad)
    for position, grad in zip(_GRAD_POSITIONS, grads):
        if needs_input_grad[position]:
            out[position] = grad
    return tuple(out)


def _setup_context(ctx, inputs, output) -> None:
    (hidden, gate_up_w, gate_up_bias, down_w, down_bias, _top_k_index, top_k_weights, up_a, up_b, down_a, down_b,
     limit, alpha) = inputs
    _out, gate_up_out, l1, l2, expert_offsets, sorted_slots = output
    ctx.mark_non_differentiable(gate_up_out, l1, l2, expert_offsets, sorted_slots)
    # X is read again only by dA1: without LoRA on gate_up an empty stand-in saves pinning it.
    kept_hidden = hidden if up_a is not None else hidden.new_empty(0)
    ctx.save_for_backward(kept_hidden, gate_up_w, gate_up_bias, down_w, down_bias, top_k_weights, gate_up_out, l1,
                          l2, expert_offsets, sorted_slots, up_a, up_b, down_a, down_b)
    ctx.limit, ctx.alpha = limit, alpha


def _op_backward(ctx, grad_out, _grad_gate_up_out, _grad_l1, _grad_l2, _grad_offsets, _grad_slots):
    grads = gptoss_experts_lora_bwd(grad_out, *ctx.saved_tensors, ctx.limit, ctx.alpha, _needs(ctx.needs_input_grad))
    return _input_grads(ctx.needs_input_grad, grads)


gptoss_experts_lora_fwd.register_autograd(_op_backward, setup_context=_setup_context)


# -------------------------------------------------------------------------------------------------
# Eager path and the entry point
# -------------------------------------------------------------------------------------------------


class _EagerLora(torch.autograd.Function):
    """The block outside torch.compile: bodies run as plain Python, kernels launched directly. H,
    the largest activation, is handed over to the backward (``block.hand_over``) rather than saved,
    so the backward frees it once the activation backward has read it; under saved-tensor hooks
    (non-reentrant checkpointing, offloading) it is saved like the rest."""

    @staticmethod
    def forward(ctx, hidden, gate_up_w, gate_up_bias, down_w, down_bias, top_k_index, top_k_weights, up_a, up_b,
                down_a, down_b, limit, alpha):
        out, h, l1, l2, offsets, slots = forward(hidden, gate_up_w, gate_up_bias, down_w, down_bias, top_k_index,
                                                 top_k_weights, up_a, up_b, down_a, down_b, limit=limit, alpha=alpha,
                                                 in_op=False)
        ctx.handed = hands_over()
        ctx.save_for_backward(hidden if up_a is not None else None, gate_up_w, gate_up_bias, down_w, down_bias,
                              top_k_weights, None if ctx.handed else h, l1, l2, offsets, slots, up_a, up_b, down_a,
                              down_b)
        ctx.h = hand_over(h) if ctx.handed else None
        ctx.limit, ctx.alpha = limit, alpha
        return out

    @staticmethod
    def backward(ctx, grad_out):
        saved = list(ctx.saved_tensors)
        if ctx.handed:
            saved[_SAVED_H] = claim(ctx, "h")
        grads = backward(grad_out, *saved, limit=ctx.limit, alpha=ctx.alpha, in_op=False,
                         **dict(zip(_NEED_NAMES, _needs(ctx.needs_input_grad))))
        return _input_grads(ctx.needs_input_grad, grads)


def gptoss_experts_lora(hidden: torch.Tensor, gate_up_w: torch.Tensor, gate_up_b: torch.Tensor, down_w: torch.Tensor,
                        down_b: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, *,
                        lora: MoeLora, limit: float, alpha: float) -> torch.Tensor:
    """``moe_tune.ops.gptoss.gptoss_experts`` with LoRA on its frozen weights: per expert,
    ``x·W[e] + scaling·(x·A[e]ᵀ)·B[e]ᵀ`` for each weight ``lora`` names, W + ΔW never built.

    Args: as ``gptoss_experts``, plus ``lora`` (``moe_tune.ops.lora.MoeLora``): factors per expert
    A ``[E, r, K]`` and B ``[E, N, r]`` with K, N of y = x·W (``[E, r, H]``, ``[E, 2I, r]`` on
    gate_up), as PEFT keeps them for these [E, K, N] weights (``LoraFactors.from_peft``); either
    weight may go without. The weights must be frozen. Gradients flow to the factors, ``hidden``,
    both biases and ``top_k_weights``.
    """
    gptoss.check_inputs(hidden, gate_up_w, gate_up_b, down_w, down_b, top_k_index, top_k_weights, limit, alpha)
    check_lora(lora, gate_up_w, down_w, hidden, kn=True)
    # (A, s·B) per weight; the names gate_up_b and down_b are the module's biases.
    factors = (*prepared(lora.gate_up, gate_up_w.dtype), *prepared(lora.down, gate_up_w.dtype))
    args = (*(t.contiguous() for t in (hidden, gate_up_w, gate_up_b, down_w, down_b, top_k_index, top_k_weights)),
            *factors, float(limit), float(alpha))
    if torch.compiler.is_compiling():
        return gptoss_experts_lora_fwd(*args)[0]
    return _EagerLora.apply(*args)
