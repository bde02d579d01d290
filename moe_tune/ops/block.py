"""The experts block's forward and backward bodies: four fused grouped-GEMM launches and two dW
launches, shared by the eager autograd path (``moe_tune.ops.moe_experts``) and the torch.library
ops that torch.compile traces (``moe_tune.ops.custom_ops``).

Data flow, with T tokens, k slots per token, M = T·k routed rows, w the routing weights:

forward
    routing     = build_routing(top_k_index)            expert_offsets [E+1], sorted_slots [M]
    H, A        = up GEMM, "glu" epilogue               H [M, 2I] = X[slot // k]·W1[e]ᵀ (kept for the
                                                        backward), A [M, I] = silu(H_gate)·H_up;
                                                        with ``sort_x`` it also writes X_s [M, H],
                                                        the gathered rows in expert order
    Y [M, H]    = w[slot] · A · W2[e]ᵀ                  down forward, scattered to slot order
    out[t]      = Σ_j Y[t·k + j]

backward (G = d out [T, H])
    dH, wA, dS  = down dx, "glu_bwd" epilogue           dA_raw = G[slot // k]·W2[e] stays in
                                                        registers: dH [M, 2I] of dA = w·dA_raw, wA =
                                                        w·A [M, I], dS = Σ dA_raw·A per column block
                                                        (summed here); G_s [M, H] = G's gathered rows
                                                        in expert order when dW2 is wanted
    dW2[e]      = G_s,eᵀ · wA_e                         both operands expert order: TMA on both
    dX          = Σ_j (dH · W1[e])[t·k + j]             up dx, scattered to slot order, summed
    dW1[e]      = dH_eᵀ · X_s,e                         TMA on both

Without ``sort_x`` (the weights need no gradient) the forward keeps X instead of X_s, and a dW1
asked for anyway gathers X's rows itself. Every config comes from the runtime loader for the six
problems of ``MoeShape.problems()`` (memoised dict hits); nothing here reads device memory on the
host, so both bodies run under CUDA-graph capture and ``set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import functools

import torch
import triton

from moe_tune import runtime
from moe_tune.device import DeviceInfo, query_device
from moe_tune.ops import launch
from moe_tune.ops.grouped_gemm import DTYPE_NAMES
from moe_tune.ops.routing import Routing, build_routing
from moe_tune.problem import KernelConfig, MoeShape, Problem
from moe_tune.space import check_config

ACTIVATIONS = ("silu",)


def _alloc(shape, dtype, device) -> torch.Tensor:
    """Every buffer a body writes through a kernel comes from here (the tests poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def size_hint(n) -> int:
    """A token count as a plain int. Under dynamic shapes T is symbolic; the config choice only
    affects speed, so it follows the example size instead of guarding on T."""
    if isinstance(n, torch.SymInt):
        hint = n.node.hint
        return int(hint) if hint is not None else int(n)
    return int(n)


def problem_dims(gate_up_w: torch.Tensor, topk) -> tuple[int, int, int, int]:
    """(E, H, I, k) as ints: they name the tuning problems and are kernel constexprs, so a
    symbolic one is specialised (a guard) rather than hinted."""
    E, two_i, H = (int(d) for d in gate_up_w.shape)
    return E, H, two_i // 2, int(topk)


@functools.lru_cache(maxsize=256)
def _problems(E: int, H: int, I: int, topk: int, dtype: str) -> dict[tuple[str, str], Problem]:
    return {(p.gemm, p.pass_): p for p in MoeShape(E, H, I, topk).problems(dtype)}


_checked: set[tuple[Problem, KernelConfig, DeviceInfo]] = set()


def _config(problem: Problem, num_tokens: int, info: DeviceInfo) -> KernelConfig:
    config = runtime.get_config(problem, num_tokens, device=info)
    key = (problem, config, info)
    if key not in _checked:
        check_config(problem, config, info)
        _checked.add(key)
    return config


def block_configs(E: int, H: int, I: int, topk: int, dtype: torch.dtype, num_tokens: int,
                  info: DeviceInfo) -> dict[tuple[str, str], KernelConfig]:
    """``{(gemm, pass): KernelConfig}`` for the block's six problems, from the runtime loader."""
    problems = _problems(E, H, I, topk, DTYPE_NAMES[dtype])
    return {key: _config(problem, num_tokens, info) for key, problem in problems.items()}


def _plain_dw_config(E, H, I, topk, dtype, num_tokens, info) -> KernelConfig:
    """Config of the up dW gathering X itself (the rare path where X_s was not kept)."""
    problem = _problems(E, H, I, topk, DTYPE_NAMES[dtype])["up", "dw"]
    return _config(problem.with_pass("dw"), num_tokens, info)


def dsp_blocks(I: int, cfg: KernelConfig) -> int:
    """Column blocks of the down dx: rows of its routing-weight-gradient partials."""
    return triton.cdiv(I, cfg.BLOCK_N)


# -------------------------------------------------------------------------------------------------
# Forward
# -------------------------------------------------------------------------------------------------


def forward(hidden: torch.Tensor, gate_up_w: torch.Tensor, down_w: torch.Tensor, top_k_index: torch.Tensor,
            top_k_weights: torch.Tensor, *, sort_x: bool, traced: bool):
    """Returns (out [T, H], H [M, 2I], X_s [M, H] (empty without ``sort_x``), expert_offsets,
    sorted_slots); all but ``out`` are what the backward needs."""
    E, H, I, k = problem_dims(gate_up_w, top_k_index.shape[1])
    T = hidden.shape[0]
    M = T * k
    device, dtype = hidden.device, hidden.dtype
    info = query_device(device)
    cfg = block_configs(E, H, I, k, dtype, size_hint(T), info)
    routing = build_routing(top_k_index, E, traced=traced)

    # -- Up GEMM + SwiGLU: gathered token rows in, H and A out in expert order -----------------
    h = _alloc((M, 2 * I), dtype, device)
    act = _alloc((M, I), dtype, device)
    x_sorted = _alloc((M, H), dtype, device) if sort_x else hidden.new_empty(0)
    launch.grouped_mm(hidden, gate_up_w, act, routing, None, trans_w=False, gather_a=True, gather_div=k,
                      scatter_c=False, cfg=cfg["up", "forward"], info=info, epilogue="glu", h=h,
                      sorted_a=x_sorted if sort_x else None, traced=traced)

    # -- Down GEMM: routing weight in the epilogue, rows stored in slot order, then summed --------
    down_out = _alloc((M, H), dtype, device)
    launch.grouped_mm(act, down_w, down_out, routing, top_k_weights.reshape(M), trans_w=False, gather_a=False,
                      gather_div=1, scatter_c=True, cfg=cfg["down", "forward"], info=info, traced=traced)
    out = down_out.view(T, k, H).sum(1)
    return out, h, x_sorted, routing.expert_offsets, routing.sorted_slots


# -------------------------------------------------------------------------------------------------
# Backward
# -------------------------------------------------------------------------------------------------


def backward(grad_out: torch.Tensor, hidden: torch.Tensor, x_sorted: torch.Tensor, gate_up_w: torch.Tensor,
             down_w: torch.Tensor, top_k_weights: torch.Tensor, h: torch.Tensor, expert_offsets: torch.Tensor,
             sorted_slots: torch.Tensor, *, need_hidden: bool, need_gate_up: bool, need_down: bool, traced: bool):
    """Returns (d hidden [T, H], d gate_up_w, d down_w, d top_k_weights [T, k]); a gradient not
    asked for comes back as an empty tensor (op outputs may not alias)."""
    E, H, I, k = problem_dims(gate_up_w, top_k_weights.shape[1])
    T = grad_out.shape[0]
    M = T * k
    device, dtype = grad_out.device, gate_up_w.dtype
    info = query_device(device)
    num_tokens = size_hint(T)
    cfg = block_configs(E, H, I, k, dtype, num_tokens, info)
    routing = Routing(expert_offsets, sorted_slots, T, k)
    grad_out = grad_out.contiguous()

    # -- Down dx with SwiGLU's backward in its epilogue ------------------------------------------
    dx_cfg = cfg["down", "dx"]
    d_h = _alloc((M, 2 * I), dtype, device)
    weighted_act = _alloc((M, I), dtype, device)
    dsp = _alloc((dsp_blocks(I, dx_cfg), M), torch.float32, device)
    g_sorted = _alloc((M, H), dtype, device) if need_down else None
    launch.grouped_mm(grad_out, down_w, d_h, routing, top_k_weights.reshape(M), trans_w=True, gather_a=True,
                      gather_div=k, scatter_c=False, cfg=dx_cfg, info=info, epilogue="glu_bwd", h=h,
                      aux=weighted_act, dsp=dsp, sorted_a=g_sorted, traced=traced)
    d_weights = dsp.sum(0).view(T, k).to(top_k_weights.dtype)

    # -- Down dW: expert-ordered G rows against w·A ------------------------------------------------
    d_down = grad_out.new_empty(0)
    if need_down:
        d_down = _alloc(tuple(down_w.shape), dtype, device)
        launch.grouped_mm_dw(g_sorted, weighted_act, d_down, routing, None, gather_dy=False, dy_div=1,
                             gather_x=False, x_div=1, cfg=cfg["down", "dw"], info=info, traced=traced)
    # Frees M·(H + I) before the up dx allocates its [M, H] slot rows.
    del g_sorted, weighted_act

    # -- Up dx: rows scattered to slot order, then the k slots of a token summed -----------------
    d_hidden = grad_out.new_empty(0)
    if need_hidden:
        d_rows = _alloc((M, H), dtype, device)
        launch.grouped_mm(d_h, gate_up_w, d_rows, routing, None, trans_w=True, gather_a=False, gather_div=1,
                          scatter_c=True, cfg=cfg["up", "dx"], info=info, traced=traced)
        d_hidden = d_rows.view(T, k, H).sum(1)
        # Free the M·H slot rows before dW1's E·2I·H buffer exists.
        del d_rows

    # -- Up dW: expert-ordered dH against X_s (or X's rows gathered, when X_s was not kept) ---------
    d_gate_up = grad_out.new_empty(0)
    if need_gate_up:
        d_gate_up = _alloc(tuple(gate_up_w.shape), dtype, device)
        if x_sorted.dim() == 2:
            launch.grouped_mm_dw(d_h, x_sorted, d_gate_up, routing, None, gather_dy=False, dy_div=1, gather_x=False,
                                 x_div=1, cfg=cfg["up", "dw"], info=info, traced=traced)
        else:
            dw_cfg = _plain_dw_config(E, H, I, k, dtype, num_tokens, info)
            launch.grouped_mm_dw(d_h, hidden, d_gate_up, routing, None, gather_dy=False, dy_div=1, gather_x=True,
                                 x_div=k, cfg=dw_cfg, info=info, traced=traced)
    return d_hidden, d_gate_up, d_down, d_weights
