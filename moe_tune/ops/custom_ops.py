"""The experts block as two torch.library ops, ``moe_tune::moe_experts_fwd`` and
``moe_tune::moe_experts_bwd``, tied together by ``register_autograd``.

Both are ``triton_op``s (see ``moe_tune.ops.launch``): torch.compile sees one custom op per pass,
Inductor traces into its body and compiles the Triton kernels in the graph, and nothing in a body
reads device memory on the host. Each body resolves the configs of the layer's six tuning problems
through ``moe_tune.runtime.get_config`` (memoised cache reads, never a benchmark) and launches the
existing grouped-GEMM kernels plus the SwiGLU kernels.

Data flow, with T tokens, k slots per token, M = T·k routed rows, w the routing weights:

forward
    routing   = build_routing(top_k_index)               expert_offsets [E+1], sorted_slots [M]
    H [M, 2I] = X[slot // k] · W1[e]ᵀ                      up forward, gathered, expert order
    A [M, I]  = silu(H[:, :I]) · H[:, I:]                  SwiGLU kernel
    Y [M, H]  = w[slot] · A · W2[e]ᵀ                       down forward, scattered to slot order,
                                                           weight multiplied in the epilogue
    out[t]    = Σ_j Y[t·k + j]
    saved: X, W1, W2, w, H, routing (A is recomputed from H; the down output is never kept)

backward (G = d out [T, H])
    dA_raw [M, I] = G[slot // k] · W2[e]                   down dx, gathered straight from G
    dH, A, dw     = SwiGLU backward(H, dA_raw, w)          dA = w·dA_raw, dw[slot] = <dA_raw, A>
    dW2[e]        = Σ_rows w·G[slot // k]ᵀ · A             down dw
    dX            = Σ_j (dH · W1[e])[t·k + j]              up dx, scattered to slot order, summed
    dW1[e]        = dH_eᵀ · X[slot // k]                   up dw

The down dx and dw read G in token order (row = slot // k) instead of an ``[M, H]`` copy of it, and
run unweighted or weighted where the tuned problem says otherwise: the tile configs are those of
the six problems of ``MoeShape.problems()``, which the sweep tunes and the cache stores.

No ``from __future__ import annotations`` here: torch.library infers op schemas from the
annotations' runtime values.
"""

import dataclasses

import torch
import triton

from moe_tune import runtime
from moe_tune.device import DeviceInfo, query_device
from moe_tune.kernels.grouped_mm import grouped_mm_dw_kernel, grouped_mm_kernel
from moe_tune.kernels.swiglu import swiglu_backward_kernel, swiglu_forward_kernel
from moe_tune.ops import grouped_gemm as gg
from moe_tune.ops.launch import register_op, traceable
from moe_tune.ops.routing import Routing, build_routing
from moe_tune.problem import KernelConfig, MoeShape
from moe_tune.space import check_config

ACTIVATIONS = ("silu",)

_KERNELS = (grouped_mm_kernel, grouped_mm_dw_kernel, swiglu_forward_kernel, swiglu_backward_kernel)

# Elements per program of the SwiGLU kernels: 4096 keeps 32 per thread at 4 warps, enough loads
# in flight for a memory-bound pass; rows × columns chosen so the I chunk stays 256 wide.
_SWIGLU_TILE = 4096
_SWIGLU_MAX_I = 256


def _alloc(shape, dtype, device) -> torch.Tensor:
    """Every buffer an op body writes through a kernel comes from here (tests poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _size_hint(n) -> int:
    """A token count as a plain int. Under dynamic shapes T is symbolic; the config choice only
    affects speed, so it follows the example size instead of guarding on T."""
    if isinstance(n, torch.SymInt):
        hint = n.node.hint
        return int(hint) if hint is not None else int(n)
    return int(n)


def _problem_dims(gate_up_w: torch.Tensor, topk) -> tuple[int, int, int, int]:
    """(E, H, I, k) as ints: they name the tuning problems and are kernel constexprs, so a
    symbolic one is specialised (a guard) rather than hinted."""
    E, two_i, H = (int(d) for d in gate_up_w.shape)
    return E, H, two_i // 2, int(topk)


def block_configs(E: int, H: int, I: int, topk: int, dtype: torch.dtype, num_tokens: int,
                  info: DeviceInfo) -> dict:
    """``{(gemm, pass): KernelConfig}`` for the layer's six problems, from the runtime loader."""
    configs: dict[tuple[str, str], KernelConfig] = {}
    for problem in MoeShape(E, H, I, topk).problems(gg._DTYPE_NAMES[dtype]):
        config = runtime.get_config(problem, num_tokens, device=info)
        check_config(problem, config, info)
        configs[problem.gemm, problem.pass_] = config
    return configs


def _swiglu_blocks(inter: int) -> tuple[int, int]:
    block_i = min(triton.next_power_of_2(inter), _SWIGLU_MAX_I)
    return _SWIGLU_TILE // block_i, block_i


# -------------------------------------------------------------------------------------------------
# Forward
# -------------------------------------------------------------------------------------------------


def _moe_experts_fwd(
    hidden: torch.Tensor,
    gate_up_w: torch.Tensor,
    down_w: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out [T, H], gate_up_out [M, 2I], expert_offsets [E+1], sorted_slots [M]); the
    last three are what the backward needs."""
    assert activation in ACTIVATIONS, activation
    E, H, I, k = _problem_dims(gate_up_w, top_k_index.shape[1])
    T, two_i = hidden.shape[0], 2 * I
    M = T * k
    device, dtype = hidden.device, hidden.dtype
    info = query_device(device)
    cfg = block_configs(E, H, I, k, dtype, _size_hint(T), info)
    routing = build_routing(top_k_index, E)
    weights = top_k_weights.reshape(M)

    # -- Up GEMM: token rows gathered on load, output in expert order --------------------------
    gate_up_out = _alloc((M, two_i), dtype, device)
    gg._launch_mm(hidden, gate_up_w, gate_up_out, routing, None, trans_w=False, gather_a=True, gather_div=k,
                  scatter_c=False, cfg=cfg["up", "forward"], info=info, traceable=True)

    # -- SwiGLU ----------------------------------------------------------------------------------
    act = _alloc((M, I), dtype, device)
    block_m, block_i = _swiglu_blocks(I)
    traceable(swiglu_forward_kernel, gate_up_out, act)[(triton.cdiv(M, block_m), triton.cdiv(I, block_i))](
        gate_up_out, act, M, I, gate_up_out.stride(0), act.stride(0),
        BLOCK_M=block_m, BLOCK_I=block_i, num_warps=4,
    )

    # -- Down GEMM: routing weight in the epilogue, rows stored in slot order, then summed ---------
    down_out = _alloc((M, H), dtype, device)
    gg._launch_mm(act, down_w, down_out, routing, weights, trans_w=False, gather_a=False, gather_div=1,
                  scatter_c=True, cfg=cfg["down", "forward"], info=info, traceable=True)
    out = down_out.view(T, k, H).sum(1)
    return out, gate_up_out, routing.expert_offsets, routing.sorted_slots


moe_experts_fwd = register_op("moe_tune::moe_experts_fwd", _moe_experts_fwd, _KERNELS)


# -------------------------------------------------------------------------------------------------
# Backward
# -------------------------------------------------------------------------------------------------


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
    assert activation in ACTIVATIONS, activation
    E, H, I, k = _problem_dims(gate_up_w, top_k_weights.shape[1])
    T, two_i = hidden.shape[0], 2 * I
    M = T * k
    device, dtype = hidden.device, hidden.dtype
    info = query_device(device)
    cfg = block_configs(E, H, I, k, dtype, _size_hint(T), info)
    routing = Routing(expert_offsets, sorted_slots, T, k)
    weights = top_k_weights.reshape(M)
    grad_out = grad_out.contiguous()

    # -- Down dx, unweighted, reading G's token rows directly: dA_raw in expert order -------------
    act = _alloc((M, I), dtype, device)  # holds dA_raw, then A
    gg._launch_mm(grad_out, down_w, act, routing, None, trans_w=True, gather_a=True, gather_div=k,
                  scatter_c=False, cfg=cfg["down", "dx"], info=info, traceable=True)

    # -- SwiGLU backward: dH, the routing-weight gradient, and A over dA_raw ----------------------
    d_gate_up_out = _alloc((M, two_i), dtype, device)
    d_weights = _alloc((T, k), top_k_weights.dtype, device)
    block_m, block_i = _swiglu_blocks(I)
    traceable(swiglu_backward_kernel, gate_up_out, act)[(triton.cdiv(M, block_m),)](
        gate_up_out, act, d_gate_up_out, weights, sorted_slots, d_weights,
        M, I, gate_up_out.stride(0), act.stride(0), d_gate_up_out.stride(0),
        BLOCK_M=block_m, BLOCK_I=block_i, num_warps=4,
    )

    # -- Down dW: G's token rows weighted by w, against A ------------------------------------------
    d_down = hidden.new_empty(0)  # op outputs may not alias: one empty tensor per skipped gradient
    if need_down:
        d_down = _alloc(tuple(down_w.shape), dtype, device)
        gg._launch_dw(grad_out, act, d_down, routing, weights, gather_dy=True, dy_div=k, gather_x=False,
                      x_div=1, cfg=cfg["down", "dw"], info=info, traceable=True)
    del act  # frees M·I before the [M, H] rows of the up dx are allocated

    # -- Up dx: rows scattered to slot order, then the k slots of a token summed -----------------
    d_hidden = hidden.new_empty(0)
    if need_hidden:
        d_rows = _alloc((M, H), dtype, device)
        gg._launch_mm(d_gate_up_out, gate_up_w, d_rows, routing, None, trans_w=True, gather_a=False,
                      gather_div=1, scatter_c=True, cfg=cfg["up", "dx"], info=info, traceable=True)
        d_hidden = d_rows.view(T, k, H).sum(1)
        # Free the M·H slot rows before dW's E·2I·H buffer exists: holding both measured 1.7% above
        # transformers' grouped_mm peak on a 32-expert block (H200, 2026-11-27).
        del d_rows

    # -- Up dW: expert-ordered dH against the gathered token rows ---------------------------------
    # Never GATHER_COPY here: its [M, H] copy would coexist with the E·2I·H gradient and lift the
    # block's peak above the unfused block's (+1.8% measured, 32-expert block, H200, 2026-11-27).
    d_gate_up = hidden.new_empty(0)
    if need_gate_up:
        d_gate_up = _alloc(tuple(gate_up_w.shape), dtype, device)
        gg._launch_dw(d_gate_up_out, hidden, d_gate_up, routing, None, gather_dy=False, dy_div=1, gather_x=True,
                      x_div=k, cfg=dataclasses.replace(cfg["up", "dw"], GATHER_COPY=False), info=info,
                      traceable=True)
    return d_hidden, d_gate_up, d_down, d_weights


moe_experts_bwd = register_op("moe_tune::moe_experts_bwd", _moe_experts_bwd, _KERNELS)


# -------------------------------------------------------------------------------------------------
# Autograd
# -------------------------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output) -> None:
    hidden, gate_up_w, down_w, _top_k_index, top_k_weights, activation = inputs
    _out, gate_up_out, expert_offsets, sorted_slots = output
    ctx.mark_non_differentiable(gate_up_out, expert_offsets, sorted_slots)
    ctx.save_for_backward(hidden, gate_up_w, down_w, top_k_weights, gate_up_out, expert_offsets, sorted_slots)
    ctx.activation = activation


def _backward(ctx, grad_out, _grad_gate_up_out, _grad_offsets, _grad_slots):
    hidden, gate_up_w, down_w, top_k_weights, gate_up_out, expert_offsets, sorted_slots = ctx.saved_tensors
    need_hidden, need_gate_up, need_down, _, need_weights, _ = ctx.needs_input_grad
    d_hidden, d_gate_up, d_down, d_weights = moe_experts_bwd(
        grad_out, hidden, gate_up_w, down_w, top_k_weights, gate_up_out, expert_offsets, sorted_slots,
        ctx.activation, need_hidden, need_gate_up, need_down,
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
