"""The experts block with LoRA on its frozen weights: forward and backward bodies, shared by the
eager autograd path (``moe_tune.ops.lora``) and the torch.library ops torch.compile traces
(``moe_tune.ops.lora_ops``).

Per expert e and projection W[e] [N, K] with LoRA factors A[e] [r, K] and B̃[e] = s·B[e] [N, r]
(the scaling folded into B by the caller): y = x·W[e]ᵀ + (x·A[e]ᵀ)·B̃[e]ᵀ. W is frozen: no base
dW runs and W + ΔW never exists. Every product below is one grouped-GEMM launch whose problem is
in ``MoeShape.lora_problems(r)`` (its key in brackets); T tokens, k slots, M = T·k routed rows in
expert order, w the routing weights, G = d out [T, H].

forward
    H [M, 2I]   = X[slot // k]·W1ᵀ                      [up.forward], no epilogue
    L1 [M, r]   = X[slot // k]·A1ᵀ                      [up_a.forward]   (kept for dB1)
    H          += L1·B̃1ᵀ, A = silu(H_gate)·H_up         [up_b.forward] + block.swiglu_forward (delta)
    L2 [M, r]   = A·A2ᵀ                                 [down_a.forward] (kept for dB2)
    out[t]      = Σ_j w·(A·W2ᵀ + L2·B̃2ᵀ)[t·k + j]       [down.forward], [down_b.forward]: one [M, H]
                                                        buffer, summed over the slots after each
backward
    P [M, r]    = G[slot // k]·B̃2                       [down_b.dx]
    dA_lora     = w·P·A2                                [down_a.dx]
    dA_raw      = G[slot // k]·W2                       [down.dx], unweighted
    dH, w·A, dw = block.swiglu_backward (lora terms)    dA = w·dA_raw + dA_lora;
                                                        dw[slot] = ⟨dA_raw, A⟩ + ⟨P, L2⟩
    dB̃2[e]      = (w·G)_eᵀ·L2_e                          [down_b.dw]
    dA2[e]      = P_eᵀ·(w·A)_e                          [down_a.dw]
    Q [M, r]    = dH·B̃1                                 [up_b.dx]
    dB̃1[e]      = dH_eᵀ·L1_e                             [up_b.dw]
    dA1[e]      = Q_eᵀ·X[slot // k]_e                   [up_a.dw]
    dX          = Σ_j (dH·W1)[t·k + j] + Σ_j (Q·A1)[t·k + j]   [up.dx], [up_a.dx]: one [M, H] buffer

A projection without LoRA runs as in ``moe_tune.ops.block`` (the same GEMMs and SwiGLU kernels,
without the LoRA terms). Saved for
the backward: X, H, L1, L2 and the routing (no X_s and no activation A: the backward recomputes
A from H). Nothing here reads device memory on the host.
"""

from __future__ import annotations

import functools

import torch

from moe_tune.device import DeviceInfo, query_device
from moe_tune.ops import launch
from moe_tune.ops.block import (block_configs, configs_for, problem_dims, size_hint, swiglu_backward,
                                swiglu_forward)
from moe_tune.ops.routing import Routing, build_routing
from moe_tune.ops.rows import slot_sum
from moe_tune.problem import KernelConfig, MoeShape, Problem

def _alloc(shape, dtype, device) -> torch.Tensor:
    """Every buffer a body writes through a kernel comes from here (the tests poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _empty(like: torch.Tensor) -> torch.Tensor:
    # Op outputs may not be None or alias an input: an absent result is a fresh empty tensor.
    return like.new_empty(0)


# -------------------------------------------------------------------------------------------------
# Configs
# -------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _problems(E: int, H: int, I: int, topk: int, dtype: str, up_rank: int, down_rank: int) -> dict[str, Problem]:
    """The LoRA problems of the projections that carry LoRA (rank 0: none)."""
    shape = MoeShape(E, H, I, topk)
    problems: dict[str, Problem] = {}
    for prefix, rank in (("up", up_rank), ("down", down_rank)):
        if rank:
            problems.update({n: p for n, p in shape.lora_problems(rank, dtype).items() if n.startswith(prefix)})
    return problems


def lora_configs(E: int, H: int, I: int, topk: int, dtype: torch.dtype, up_rank: int, down_rank: int,
                 num_tokens: int, info: DeviceInfo) -> dict[str, KernelConfig]:
    """``{"<matrix>.<pass>": KernelConfig}`` from the runtime loader for the problems the block
    launches (``MoeShape.lora_problems`` keys; a projection without LoRA uses the base block's
    fused problems, under ``moe_tune.ops.block.block_configs``' keys)."""
    return configs_for(_problems, E, H, I, topk, dtype, num_tokens, info, up_rank, down_rank)


def _rank(factor_a) -> int:
    return int(factor_a.shape[1]) if factor_a is not None else 0


# -------------------------------------------------------------------------------------------------
# The factors' GEMMs (the same for the gpt-oss layout: ``moe_tune.ops.gptoss_lora``)
# -------------------------------------------------------------------------------------------------


def up_delta(hidden, up_a, up_b, routing: Routing, cfg: dict, info: DeviceInfo, *, in_op: bool):
    """L1 = X[slot // k]·A1ᵀ [M, r] and ΔH = L1·B̃1ᵀ [M, 2I], both in expert order."""
    M = routing.num_rows
    l1 = _alloc((M, up_a.shape[1]), hidden.dtype, hidden.device)
    launch.grouped_mm(hidden, up_a, l1, routing, None, trans_w=False, gather_a=True, gather_div=routing.topk,
                      scatter_c=False, cfg=cfg["up_a.forward"], info=info, in_op=in_op)
    delta = _alloc((M, up_b.shape[1]), hidden.dtype, hidden.device)
    launch.grouped_mm(l1, up_b, delta, routing, None, trans_w=False, gather_a=False, gather_div=1,
                      scatter_c=False, cfg=cfg["up_b.forward"], info=info, in_op=in_op)
    return l1, delta


def down_rows(act, down_a, down_b, weights, rows, routing: Routing, cfg: dict, info: DeviceInfo, *, in_op: bool):
    """L2 = A·A2ᵀ [M, r] (returned, kept for dB̃2) and w·L2·B̃2ᵀ written to ``rows`` [M, H] in slot order."""
    l2 = _alloc((routing.num_rows, down_a.shape[1]), act.dtype, act.device)
    launch.grouped_mm(act, down_a, l2, routing, None, trans_w=False, gather_a=False, gather_div=1,
                      scatter_c=False, cfg=cfg["down_a.forward"], info=info, in_op=in_op)
    launch.grouped_mm(l2, down_b, rows, routing, weights, trans_w=False, gather_a=False, gather_div=1,
                      scatter_c=True, cfg=cfg["down_b.forward"], info=info, in_op=in_op)
    return l2


def down_dx(grad_out, down_a, down_b, weights, routing: Routing, cfg: dict, info: DeviceInfo, *, in_op: bool):
    """P = G[slot // k]·B̃2 [M, r] and dA_lora = w·P·A2 [M, I], in expert order."""
    M, dtype, device = routing.num_rows, down_a.dtype, grad_out.device
    p = _alloc((M, down_a.shape[1]), dtype, device)
    launch.grouped_mm(grad_out, down_b, p, routing, None, trans_w=True, gather_a=True, gather_div=routing.topk,
                      scatter_c=False, cfg=cfg["down_b.dx"], info=info, in_op=in_op)
    d_act_lora = _alloc((M, down_a.shape[2]), dtype, device)
    launch.grouped_mm(p, down_a, d_act_lora, routing, weights, trans_w=True, gather_a=False, gather_div=1,
                      scatter_c=False, cfg=cfg["down_a.dx"], info=info, in_op=in_op)
    return p, d_act_lora


def down_dw(grad_out, p, l2, weighted_act, down_a, down_b, weights, routing: Routing, cfg: dict, info: DeviceInfo, *,
            need_down_a: bool, need_down_b: bool, in_op: bool):
    """(dA2 = Pᵀ·(w·A), dB̃2 = (w·G)ᵀ·L2) per expert; one not asked for is an empty tensor."""
    d_down_a, d_down_b = _empty(grad_out), _empty(grad_out)
    if need_down_b:
        d_down_b = _alloc(tuple(down_b.shape), down_b.dtype, grad_out.device)
        launch.grouped_mm_dw(grad_out, l2, d_down_b, routing, weights, gather_dy=True, dy_div=routing.topk,
                             gather_x=False, x_div=1, cfg=cfg["down_b.dw"], info=info, in_op=in_op)
    if need_down_a:
        d_down_a = _alloc(tuple(down_a.shape), down_a.dtype, grad_out.device)
        launch.grouped_mm_dw(p, weighted_act, d_down_a, routing, None, gather_dy=False, dy_div=1, gather_x=False,
                             x_div=1, cfg=cfg["down_a.dw"], info=info, in_op=in_op)
    return d_down_a, d_down_b


def up_backward(d_h, hidden, l1, up_a, up_b, routing: Routing, cfg: dict, info: DeviceInfo, *, need_q: bool,
                need_up_a: bool, need_up_b: bool, in_op: bool):
    """(Q = dH·B̃1 [M, r] or None, dA1 = Qᵀ·X[slot // k], dB̃1 = dHᵀ·L1); a gradient not asked for is
    an empty tensor. Q is made when dA1 or (``need_q``) dX needs it."""
    q, d_up_a, d_up_b = None, _empty(d_h), _empty(d_h)
    if need_q or need_up_a:
        q = _alloc((routing.num_rows, up_a.shape[1]), d_h.dtype, d_h.device)
        launch.grouped_mm(d_h, up_b, q, routing, None, trans_w=True, gather_a=False, gather_div=1,
                          scatter_c=False, cfg=cfg["up_b.dx"], info=info, in_op=in_op)
    if need_up_b:
        d_up_b = _alloc(tuple(up_b.shape), up_b.dtype, d_h.device)
        launch.grouped_mm_dw(d_h, l1, d_up_b, routing, None, gather_dy=False, dy_div=1, gather_x=False, x_div=1,
                             cfg=cfg["up_b.dw"], info=info, in_op=in_op)
    if need_up_a:
        d_up_a = _alloc(tuple(up_a.shape), up_a.dtype, d_h.device)
        launch.grouped_mm_dw(q, hidden, d_up_a, routing, None, gather_dy=False, dy_div=1, gather_x=True,
                             x_div=routing.topk, cfg=cfg["up_a.dw"], info=info, in_op=in_op)
    return q, d_up_a, d_up_b


def up_a_dx_rows(q, up_a, rows, routing: Routing, cfg: dict, info: DeviceInfo, *, in_op: bool) -> None:
    """Q·A1 written to ``rows`` [M, H] in slot order (the LoRA part of dX, before the slot sum)."""
    launch.grouped_mm(q, up_a, rows, routing, None, trans_w=True, gather_a=False, gather_div=1, scatter_c=True,
                      cfg=cfg["up_a.dx"], info=info, in_op=in_op)


# -------------------------------------------------------------------------------------------------
# Forward
# -------------------------------------------------------------------------------------------------


def forward(hidden, gate_up_w, down_w, top_k_index, top_k_weights, up_a, up_b, down_a, down_b, *, in_op: bool):
    """``up_a`` [E, r1, H], ``up_b`` [E, 2I, r1] (scaled), ``down_a`` [E, r2, I], ``down_b``
    [E, H, r2] (scaled), contiguous; None where a projection has no LoRA. Returns (out [T, H],
    H [M, 2I], L1 [M, r1], L2 [M, r2], expert_offsets, sorted_slots), L1/L2 empty without LoRA."""
    E, H, I, k = problem_dims(gate_up_w, top_k_index.shape[1])
    T = hidden.shape[0]
    M = T * k
    device, dtype = hidden.device, hidden.dtype
    info = query_device(device)
    num_tokens = size_hint(T)
    cfg = lora_configs(E, H, I, k, dtype, _rank(up_a), _rank(down_a), num_tokens, info)
    routing = build_routing(top_k_index, E, in_op=in_op)
    weights = top_k_weights.reshape(M)

    # -- Up: base and LoRA parts of H summed, then SwiGLU ---------------------------------------
    h = _alloc((M, 2 * I), dtype, device)
    act = _alloc((M, I), dtype, device)
    l1 = _empty(hidden)
    if up_a is None:
        launch.grouped_mm(hidden, gate_up_w, h, routing, None, trans_w=False, gather_a=True, gather_div=k,
                          scatter_c=False, cfg=block_configs(E, H, I, k, dtype, num_tokens, info)["up", "forward"],
                          info=info, in_op=in_op)
        swiglu_forward(h, act, in_op=in_op)
    else:
        launch.grouped_mm(hidden, gate_up_w, h, routing, None, trans_w=False, gather_a=True, gather_div=k,
                          scatter_c=False, cfg=cfg["up.forward"], info=info, in_op=in_op)
        l1, h_lora = up_delta(hidden, up_a, up_b, routing, cfg, info, in_op=in_op)
        swiglu_forward(h, act, delta=h_lora, in_op=in_op)
        del h_lora

    # -- Down: base rows, summed over the slots; LoRA rows into the same buffer, summed on top ----
    down_cfg = cfg.get("down.forward") or block_configs(E, H, I, k, dtype, num_tokens, info)["down", "forward"]
    rows = _alloc((M, H), dtype, device)
    launch.grouped_mm(act, down_w, rows, routing, weights, trans_w=False, gather_a=False, gather_div=1,
                      scatter_c=True, cfg=down_cfg, info=info, in_op=in_op)
    out = slot_sum(rows, k, _alloc((T, H), dtype, device), in_op=in_op)
    l2 = _empty(hidden)
    if down_a is not None:
        l2 = down_rows(act, down_a, down_b, weights, rows, routing, cfg, info, in_op=in_op)
        slot_sum(rows, k, out, accumulate=True, in_op=in_op)
    return out, h, l1, l2, routing.expert_offsets, routing.sorted_slots


# -------------------------------------------------------------------------------------------------
# Backward
# -------------------------------------------------------------------------------------------------


def backward(grad_out, hidden, gate_up_w, down_w, top_k_weights, h, l1, l2, expert_offsets, sorted_slots,
             up_a, up_b, down_a, down_b, *, need_hidden: bool, need_up_a: bool, need_up_b: bool,
             need_down_a: bool, need_down_b: bool, in_op: bool):
    """Returns (d hidden [T, H], d up_a, d up_b, d down_a, d down_b, d top_k_weights [T, k]); a
    gradient not asked for comes back as an empty tensor. ``hidden`` may be empty when up_a is
    None (only dA1 reads it)."""
    E, H, I, k = problem_dims(gate_up_w, top_k_weights.shape[1])
    T = grad_out.shape[0]
    M = T * k
    device, dtype = grad_out.device, gate_up_w.dtype
    info = query_device(device)
    num_tokens = size_hint(T)
    cfg = lora_configs(E, H, I, k, dtype, _rank(up_a), _rank(down_a), num_tokens, info)
    routing = Routing(expert_offsets, sorted_slots, T, k)
    grad_out = grad_out.contiguous()
    weights = top_k_weights.reshape(M)
    d_down_a, d_down_b = _empty(grad_out), _empty(grad_out)

    # -- Down: dA, SwiGLU's backward and the routing-weight gradient ------------------------------
    d_h = _alloc((M, 2 * I), dtype, device)
    if down_a is None:
        d_act = _alloc((M, I), dtype, device)
        launch.grouped_mm(grad_out, down_w, d_act, routing, None, trans_w=True, gather_a=True, gather_div=k,
                          scatter_c=False, cfg=block_configs(E, H, I, k, dtype, num_tokens, info)["down", "dx"],
                          info=info, in_op=in_op)
        d_weights = _alloc((T, k), top_k_weights.dtype, device)
        swiglu_backward(d_act, h, weights, sorted_slots, d_h, d_weights, in_op=in_op)
        del d_act
    else:
        p, d_act_lora = down_dx(grad_out, down_a, down_b, weights, routing, cfg, info, in_op=in_op)
        d_act = _alloc((M, I), dtype, device)
        launch.grouped_mm(grad_out, down_w, d_act, routing, None, trans_w=True, gather_a=True, gather_div=k,
                          scatter_c=False, cfg=cfg["down.dx"], info=info, in_op=in_op)
        d_weights = _alloc((T, k), top_k_weights.dtype, device)
        swiglu_backward(d_act, h, weights, sorted_slots, d_h, d_weights, lora=(d_act_lora, p, l2), in_op=in_op)
        del d_act_lora
        weighted_act = d_act  # swiglu_backward wrote w·A over dA_raw
        d_down_a, d_down_b = down_dw(grad_out, p, l2, weighted_act, down_a, down_b, weights, routing, cfg, info,
                                     need_down_a=need_down_a, need_down_b=need_down_b, in_op=in_op)
        del p, d_act, weighted_act

    # -- Up: dL1 = dH·B̃1, the LoRA weight gradients, then dX --------------------------------------
    q, d_up_a, d_up_b = None, _empty(grad_out), _empty(grad_out)
    if up_a is not None:
        q, d_up_a, d_up_b = up_backward(d_h, hidden, l1, up_a, up_b, routing, cfg, info, need_q=need_hidden,
                                        need_up_a=need_up_a, need_up_b=need_up_b, in_op=in_op)
    d_hidden = _empty(grad_out)
    if need_hidden:
        up_dx_cfg = cfg.get("up.dx") or block_configs(E, H, I, k, dtype, num_tokens, info)["up", "dx"]
        rows = _alloc((M, H), dtype, device)
        launch.grouped_mm(d_h, gate_up_w, rows, routing, None, trans_w=True, gather_a=False, gather_div=1,
                          scatter_c=True, cfg=up_dx_cfg, info=info, in_op=in_op)
        del d_h
        d_hidden = slot_sum(rows, k, _alloc((T, H), dtype, device), in_op=in_op)
        if q is not None:
            up_a_dx_rows(q, up_a, rows, routing, cfg, info, in_op=in_op)
            slot_sum(rows, k, d_hidden, accumulate=True, in_op=in_op)
    return d_hidden, d_up_a, d_up_b, d_down_a, d_down_b, d_weights
