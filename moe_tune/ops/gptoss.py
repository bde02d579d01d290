"""``gptoss_experts``: the gpt-oss experts block (transformers ``GptOssExperts``), forward and
backward, on moe-tune's grouped-GEMM kernels plus three kernels of its own
(``moe_tune.kernels.gptoss``).

The layout, as transformers stores it: ``gate_up_w [E, H, 2I]`` and ``down_w [E, I, H]`` (y = x·W,
``is_transposed=True``), biases ``gate_up_b [E, 2I]`` and ``down_b [E, H]``, gate/up interleaved
along 2I, the clamped SwiGLU of ``moe_tune.kernels.gptoss``. The grouped-GEMM kernels read those
weights as stored, through their ``trans_w`` stride swap: no transposed copies.

Data flow, with T tokens, k slots per token, M = T·k routed rows, w the routing weights:

forward
    routing     = build_routing(top_k_index)            expert_offsets [E+1], sorted_slots [M]
    H [M, 2I]   = X[slot // k]·W1[e]                    up GEMM, trans_w on W1 as stored, gathered
                                                        on load. H is kept without its bias (the
                                                        kernels add b1)
    A [M, I]    = act(H + b1[e])                        activation kernel
    Y [M, H]    = w[slot] · A·W2[e]                     down GEMM, trans_w, scattered to slot order
    out[t]      = Σ_j (Y[t·k+j] + w[t,j]·b2[e])         combine kernel (the k-slot sum + the bias)

backward (G = d out [T, H])
    dA_raw      = G[slot // k]·W2[e]ᵀ                   down dx (expert order), gathered on load
    dH, w·A, dS, db1, db2                               one kernel (``gptoss_bwd_kernel``): per
                                                        expert and column block, dH of dA = w·dA_raw
                                                        (zero where clamped), w·A, the routing-weight
                                                        gradient dS = ⟨dA_raw, A⟩ + ⟨G, b2[e]⟩ in
                                                        float32 partials, db1[e] = Σ dH rows,
                                                        db2[e] = Σ w·G rows
    dX          = Σ_j (dH·W1[e]ᵀ)[t·k + j]              up dx, scattered to slot order, summed
    dW1[e]      = X_s,eᵀ · dH_e                         X_s = X's rows copied to expert order
                                                        (``block.expert_rows``) just before
    dW2[e]      = (w·A)_eᵀ · G_s,e                      G_s = G's rows, likewise; both dW stream
                                                        their operands through TMA

The row copies are separate launches, as in the Qwen-layout block: the up forward and the down dx
used to write the rows they gather ("sort" fusion, ``SORT_A``), which cost those GEMMs 0.07-0.49 ms
more than a copy costs on its own (H200; BENCHMARKS.md), and kept X_s alive from the forward to
the backward. The order keeps the peak low: the eager path hands H over to the backward instead of
saving it (``block.hand_over``), which frees it after the activation backward; each copy lives
only while its dW runs, and the larger weight gradient (dW1) is made before dW2 exists.

Two paths reach these bodies, as for the Qwen-layout block (``moe_tune.ops.moe_experts``): an
eager ``torch.autograd.Function``, and, under torch.compile, the ``moe_tune::gptoss_experts_fwd`` /
``_bwd`` ops (``register_autograd``), so ``fullgraph=True`` holds. Every launch, the routing's
included, goes through ``launch.launch_kernel`` with the body's ``in_op``, which launches nothing
on the fake tensors torch.compile traces an op's body with.
Every GEMM config comes from the runtime loader for the six problems of
``MoeShape(layout="gpt_oss").problems()``; nothing reads device memory on the host.

The clamps decide on H as stored (rounded once to the activations' dtype), so a pre-activation
within one rounding of ±limit may take the other side of it from the exact value: its gradient is
then all or nothing. In bf16 that moves d hidden, d W1 and d b1 by 2-3% against a float64
reference (``tests/ops/gptoss_reference.py``); exact decisions would need the up GEMM's float32
accumulator, i.e. H stored in float32.

No ``from __future__ import annotations``: torch.library infers the ops' schemas from the
annotations' runtime values.
"""

import functools

import torch

from moe_tune.device import DeviceInfo, query_device
from moe_tune.errors import InvalidInputError
from moe_tune.kernels.gptoss import gptoss_act_fwd_kernel, gptoss_bwd_kernel, gptoss_combine_kernel
from moe_tune.ops import launch
from moe_tune.ops.block import (claim, configs_for, expert_rows, hand_over, hands_over, part_context, size_hint,
                                take)
from moe_tune.ops.routing import build_routing, check_routing_args
from moe_tune.ops.rows import slot_sum
from moe_tune.problem import KernelConfig, MoeShape, Problem

_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# Tiles of the three elementwise kernels. Not tuned per GPU: each streams its rows once, and 64
# columns of I are 128 interleaved gate/up columns, 256 bytes of bf16 per row per load. The
# backward's: with H and dH as (gate, up) pair words (``BWD_PACKED``), plain stores and the bias
# gradients summed once per program, the best by geometric mean of 21 tiles × stages over
# gpt-oss-20b/120b at 4096 and 16384 tokens (benchmarks/gpu_gptoss_bwd_probe.py --stores, H200,
# 2026-11-28): 1.22× the 32-row steps shipped before (150 registers a thread: three programs an SM);
# its row loop keeps two 16-row steps of dA and H in flight.
ACT_BLOCK_M, ACT_BLOCK_N = 32, 64
COMBINE_BLOCK_T, COMBINE_BLOCK_N = 16, 128
BWD_BLOCK_M, BWD_BLOCK_N, BWD_WARPS, BWD_STAGES = 16, 64, 4, 3
# The same kernel's down-bias programs (db2 and ⟨G, b2[e]⟩ over gathered rows of G): the best of eight
# tiles by geometric mean (--db2, same probe and points), 1.09× the activation's own 16×64; larger
# ones raised the registers of the whole kernel, whose two branches are one compile.
BWD_DB2_BLOCK_M, BWD_DB2_BLOCK_N = 32, 128
BWD_TMA = True  # dA and H read through descriptors where the device and the rows allow (``activation_backward``)
# 16-bit H and dH read and written as int32 words of (gate, up) pairs where their rows allow
# (``_pair_words``): every tile of a step then has one shape and one layout.
BWD_PACKED = True
ELEMENTWISE_WARPS = 4


def _alloc(shape, dtype, device) -> torch.Tensor:
    """Every buffer a body writes through a kernel comes from here (the tests poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def problem_dims(gate_up_w: torch.Tensor, topk) -> tuple[int, int, int, int]:
    """(E, H, I, k) from ``gate_up_w [E, H, 2I]``, as ints (they name the tuning problems)."""
    E, H, two_i = (int(d) for d in gate_up_w.shape)
    return E, H, two_i // 2, int(topk)


# -------------------------------------------------------------------------------------------------
# Configs
# -------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _problems(E: int, H: int, I: int, topk: int, dtype: str) -> dict[tuple[str, str], Problem]:
    return {(p.gemm, p.pass_): p for p in MoeShape(E, H, I, topk, layout="gpt_oss").problems(dtype)}


def block_configs(E: int, H: int, I: int, topk: int, dtype: torch.dtype, num_tokens: int,
                  info: DeviceInfo) -> dict[tuple[str, str], KernelConfig]:
    """``{(gemm, pass): KernelConfig}`` for the block's six problems (``block.configs_for``)."""
    return configs_for(_problems, E, H, I, topk, dtype, num_tokens, info)


def dsp_rows(I: int, H: int, with_down_bias: bool) -> tuple[int, int]:
    """(column blocks of I, column blocks of H) of the backward kernel's grid: the rows of its
    routing-weight-gradient partials. The H part runs only when db2 or dS is wanted."""
    return launch.cdiv(I, BWD_BLOCK_N), launch.cdiv(H, BWD_DB2_BLOCK_N) if with_down_bias else 0


# -------------------------------------------------------------------------------------------------
# Forward
# -------------------------------------------------------------------------------------------------


def forward(hidden: torch.Tensor, gate_up_w: torch.Tensor, gate_up_b: torch.Tensor, down_w: torch.Tensor,
            down_b: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, *, limit: float,
            alpha: float, in_op: bool):
    """Returns (out [T, H], H [M, 2I] without bias, expert_offsets, sorted_slots); all but ``out``
    are what the backward needs."""
    E, H, I, k = problem_dims(gate_up_w, top_k_index.shape[1])
    T = hidden.shape[0]
    M = T * k
    device, dtype = hidden.device, hidden.dtype
    info = query_device(device)
    cfg = block_configs(E, H, I, k, dtype, size_hint(T), info)
    routing = build_routing(top_k_index, E, in_op=in_op)
    flat_index = top_k_index.reshape(M)

    # -- Up GEMM on W1 as stored ([E, H, 2I]: trans_w), gathered token rows in, H out in expert order
    h = _alloc((M, 2 * I), dtype, device)
    launch.grouped_mm(hidden, gate_up_w, h, routing, None, trans_w=True, gather_a=True, gather_div=k,
                      scatter_c=False, cfg=cfg["up", "forward"], info=info, in_op=in_op)

    # -- Bias + interleaved clamped SwiGLU ------------------------------------------------------
    act = _alloc((M, I), dtype, device)
    activation(h, gate_up_b, act, routing.sorted_slots, flat_index, limit=limit, alpha=alpha, in_op=in_op)

    # -- Down GEMM on W2 as stored ([E, I, H]: trans_w), routing weight in the epilogue, slot order
    weights = top_k_weights.reshape(M)
    down_out = _alloc((M, H), dtype, device)
    launch.grouped_mm(act, down_w, down_out, routing, weights, trans_w=True, gather_a=False, gather_div=1,
                      scatter_c=True, cfg=cfg["down", "forward"], info=info, in_op=in_op)

    # -- k-slot sum + routing-weighted down bias ---------------------------------------------------
    out = combine(down_out, down_b, weights, flat_index, T, k, in_op=in_op)
    return out, h, routing.expert_offsets, routing.sorted_slots


def activation(h: torch.Tensor, gate_up_b: torch.Tensor, act: torch.Tensor, sorted_slots: torch.Tensor,
               flat_index: torch.Tensor, *, limit: float, alpha: float, delta: torch.Tensor | None = None,
               in_op: bool) -> None:
    """``act`` [M, I] = clamped SwiGLU of (H + b1[e]) over expert-ordered rows; with ``delta``
    [M, 2I], H += delta first (stored, so the backward reads the sum)."""
    M, I = act.shape
    other = delta if delta is not None else h
    launch.launch_kernel(
        gptoss_act_fwd_kernel, in_op, (launch.cdiv(M, ACT_BLOCK_M), launch.cdiv(I, ACT_BLOCK_N)),
        (h, other, gate_up_b, act, sorted_slots, flat_index, M, I, limit, alpha,
         h.stride(0), other.stride(0), gate_up_b.stride(0), act.stride(0)),
        dict(HAS_DELTA=delta is not None, BLOCK_M=ACT_BLOCK_M, BLOCK_N=ACT_BLOCK_N, num_warps=ELEMENTWISE_WARPS),
        (h, act))


def combine(down_out: torch.Tensor, down_b: torch.Tensor, weights: torch.Tensor, flat_index: torch.Tensor, T, k: int,
            *, extra: torch.Tensor | None = None, in_op: bool) -> torch.Tensor:
    """out [T, H] = Σ_j (down_out (+ extra) + w·b2[e]) over each token's k slot rows."""
    H = down_out.shape[1]
    out = _alloc((T, H), down_out.dtype, down_out.device)
    other = extra if extra is not None else down_out
    launch.launch_kernel(
        gptoss_combine_kernel, in_op, (launch.cdiv(T, COMBINE_BLOCK_T), launch.cdiv(H, COMBINE_BLOCK_N)),
        (down_out, other, down_b, weights, flat_index, out, T, H, k, down_out.stride(0), other.stride(0),
         down_b.stride(0), out.stride(0)),
        dict(HAS_Y2=extra is not None, BLOCK_T=COMBINE_BLOCK_T, BLOCK_N=COMBINE_BLOCK_N, num_warps=ELEMENTWISE_WARPS),
        (out,))
    return out


# -------------------------------------------------------------------------------------------------
# Backward
# -------------------------------------------------------------------------------------------------


def backward_act(grad_out: torch.Tensor, gate_up_b: torch.Tensor, down_w: torch.Tensor, down_b: torch.Tensor,
                 top_k_weights: torch.Tensor, h, expert_offsets: torch.Tensor, sorted_slots: torch.Tensor, *,
                 limit: float, alpha: float, need_down_b: bool, need_weights: bool, in_op: bool):
    """Down dx and the activation backward: returns (dH [M, 2I], w·A [M, I], d gate_up_b,
    d down_b, d top_k_weights [T, k]); a gradient not asked for comes back empty. d
    gate_up_b is always computed: it is a register sum inside the pass that writes dH. ``h``: the
    forward's H, or a ``hand_over`` list holding it (then freed once read)."""
    E, I, H = (int(d) for d in down_w.shape)
    k = int(top_k_weights.shape[1])
    T = grad_out.shape[0]
    M = T * k
    device, dtype = grad_out.device, down_w.dtype
    info, cfg, routing = part_context(block_configs, E, H, I, k, T, dtype, device, expert_offsets, sorted_slots)
    h = take(h)
    grad_out = grad_out.contiguous()

    # -- Down dx: dA_raw = G·W2[e]ᵀ (W2 as stored is [I, H] per expert: no trans_w) --------------
    d_act = _alloc((M, I), dtype, device)
    launch.grouped_mm(grad_out, down_w, d_act, routing, None, trans_w=False, gather_a=True, gather_div=k,
                      scatter_c=False, cfg=cfg["down", "dx"], info=info, in_op=in_op)

    # -- Activation backward, both bias gradients, routing-weight gradient: one launch ------------
    d_h, weighted_act, d_gate_up_b, d_down_b, d_weights = activation_backward(
        d_act, h, gate_up_b, grad_out, down_b, top_k_weights, expert_offsets, sorted_slots, limit=limit,
        alpha=alpha, need_down_b=need_down_b, need_weights=need_weights, in_op=in_op)
    return d_h, weighted_act, d_gate_up_b, d_down_b, d_weights


def _pair_words(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` [M, 2I] (16-bit, interleaved gate/up) as an int32 view [M, I], one pair a word; None
    where its dtype or strides do not allow one."""
    if t.dtype not in (torch.bfloat16, torch.float16) or t.dim() != 2 or t.stride(1) != 1 or t.shape[1] % 2:
        return None
    if t.stride(0) % 2 or t.storage_offset() % 2:
        return None
    return t.view(torch.int32)


def activation_backward(d_act: torch.Tensor, h: torch.Tensor, gate_up_b: torch.Tensor, grad_out: torch.Tensor,
                        down_b: torch.Tensor, top_k_weights: torch.Tensor, expert_offsets: torch.Tensor,
                        sorted_slots: torch.Tensor, *, limit: float, alpha: float, need_down_b: bool,
                        need_weights: bool, lora: tuple | None = None, in_op: bool):
    """``gptoss_bwd_kernel`` over dA_raw [M, I] (expert order): returns (dH [M, 2I], w·A [M, I],
    d gate_up_b, d down_b or empty, d top_k_weights [T, k] or empty). ``lora``: (dA_lora [M, I],
    P [M, r], L2 [M, r]) of the down LoRA (``moe_tune.ops.gptoss_lora``)."""
    M, I = d_act.shape
    T, k = top_k_weights.shape
    E, H = down_b.shape
    device, dtype = d_act.device, d_act.dtype
    weights = top_k_weights.reshape(M)
    with_down_bias = need_down_b or need_weights
    i_blocks, h_blocks = dsp_rows(I, H, with_down_bias)
    d_h = _alloc((M, 2 * I), dtype, device)
    weighted_act = _alloc((M, I), dtype, device)
    dsp = _alloc((i_blocks + h_blocks, M), torch.float32, device)
    d_gate_up_b = _alloc((E, 2 * I), gate_up_b.dtype, device)
    d_down_b = _alloc((E, H), down_b.dtype, device) if with_down_bias else grad_out.new_empty(0)
    db2_arg = d_down_b if with_down_bias else d_gate_up_b  # never written when h_blocks == 0
    d_lora, p, l2 = lora if lora is not None else (d_act, d_act, d_act)
    rank = p.shape[1] if lora is not None else 0
    h_words, d_h_words = (_pair_words(h), _pair_words(d_h)) if BWD_PACKED else (None, None)
    packed = h_words is not None and d_h_words is not None
    h_arg, d_h_arg = (h_words, d_h_words) if packed else (h, d_h)
    # Only the loads go through descriptors (the kernel's stores are plain).
    tma = BWD_TMA and query_device(device).supports_tma and launch.rows_fit_descriptors(d_act, h_arg)
    if tma:
        launch.ensure_descriptor_allocator(device)
    launch.launch_kernel(
        gptoss_bwd_kernel, in_op, (i_blocks + h_blocks, E),
        (d_act, d_lora, p, l2, h_arg, gate_up_b, grad_out, down_b, weights, sorted_slots, expert_offsets,
         d_h_arg, weighted_act, dsp, d_gate_up_b, db2_arg,
         M, I, H, k, rank, limit, alpha,
         d_act.stride(0), d_lora.stride(0), p.stride(0), l2.stride(0), h_arg.stride(0), gate_up_b.stride(0),
         grad_out.stride(0), down_b.stride(0), d_h_arg.stride(0), weighted_act.stride(0), d_gate_up_b.stride(0),
         db2_arg.stride(0)),
        dict(I_BLOCKS=i_blocks, LORA=lora is not None, BLOCK_M=BWD_BLOCK_M, BLOCK_N=BWD_BLOCK_N,
             DB2_BLOCK_M=BWD_DB2_BLOCK_M, DB2_BLOCK_N=BWD_DB2_BLOCK_N,
             BLOCK_R=max(16, launch.next_power_of_2(rank)), STAGES=BWD_STAGES, TMA=tma, PACKED=packed,
             num_warps=BWD_WARPS),
        (d_h, weighted_act, dsp, d_gate_up_b, d_down_b))
    d_weights = grad_out.new_empty(0)
    if need_weights:
        d_weights = dsp.sum(0).view(T, k).to(top_k_weights.dtype)
    return d_h, weighted_act, d_gate_up_b, d_down_b, d_weights


def backward_up(d_h, hidden: torch.Tensor, gate_up_w: torch.Tensor, expert_offsets: torch.Tensor,
                sorted_slots: torch.Tensor, topk: int, *, need_hidden: bool, need_gate_up: bool, in_op: bool):
    """Up dx and up dW: returns (d hidden [T, H], d gate_up_w), one not asked for as an empty tensor.
    ``d_h``: dH, or a ``hand_over`` list holding it (then freed once dW1 is made)."""
    E, H, I, k = problem_dims(gate_up_w, topk)
    d_h = take(d_h)
    M = d_h.shape[0]
    T = M // k if k else 0
    device, dtype = d_h.device, gate_up_w.dtype
    info, cfg, routing = part_context(block_configs, E, H, I, k, T, dtype, device, expert_offsets, sorted_slots)

    # -- Up dx: dH·W1[e]ᵀ (W1 as stored is [H, 2I]: no trans_w), slot order, k slots summed -------
    d_hidden = d_h.new_empty(0)
    if need_hidden:
        d_rows = _alloc((M, H), dtype, device)
        launch.grouped_mm(d_h, gate_up_w, d_rows, routing, None, trans_w=False, gather_a=False, gather_div=1,
                          scatter_c=True, cfg=cfg["up", "dx"], info=info, in_op=in_op)
        d_hidden = slot_sum(d_rows, k, _alloc((T, H), dtype, device), in_op=in_op)
        del d_rows

    # -- Up dW: dW1[e] [H, 2I] = X_s,eᵀ · dH_e, X's rows copied to expert order first --------------
    d_gate_up = d_h.new_empty(0)
    if need_gate_up:
        x_sorted = expert_rows(hidden, sorted_slots, k, in_op=in_op)
        d_gate_up = _alloc(tuple(gate_up_w.shape), dtype, device)
        launch.grouped_mm_dw(x_sorted, d_h, d_gate_up, routing, None, gather_dy=False, dy_div=1,
                             gather_x=False, x_div=1, cfg=cfg["up", "dw"], info=info, in_op=in_op)
    return d_hidden, d_gate_up


def backward_down(grad_out: torch.Tensor, weighted_act: torch.Tensor, down_w: torch.Tensor,
                  expert_offsets: torch.Tensor, sorted_slots: torch.Tensor, topk: int, *, in_op: bool) -> torch.Tensor:
    """Down dW: dW2[e] [I, H] = (w·A)_eᵀ · G_s,e, G's rows copied to expert order first (w·A:
    ``backward_act``'s second output)."""
    E, I, H = (int(d) for d in down_w.shape)
    k = int(topk)
    M = weighted_act.shape[0]
    T = M // k if k else 0
    device, dtype = weighted_act.device, down_w.dtype
    info, cfg, routing = part_context(block_configs, E, H, I, k, T, dtype, device, expert_offsets, sorted_slots)
    g_sorted = expert_rows(grad_out, sorted_slots, k, in_op=in_op)
    d_down = _alloc(tuple(down_w.shape), dtype, device)
    launch.grouped_mm_dw(weighted_act, g_sorted, d_down, routing, None, gather_dy=False, dy_div=1,
                         gather_x=False, x_div=1, cfg=cfg["down", "dw"], info=info, in_op=in_op)
    return d_down


def backward(grad_out: torch.Tensor, hidden: torch.Tensor, gate_up_w: torch.Tensor,
             gate_up_b: torch.Tensor, down_w: torch.Tensor, down_b: torch.Tensor, top_k_weights: torch.Tensor, h,
             expert_offsets: torch.Tensor, sorted_slots: torch.Tensor, *, limit: float, alpha: float,
             need_hidden: bool, need_gate_up: bool, need_down: bool, need_down_b: bool, need_weights: bool):
    """The eager backward, the three parts in order: returns (d hidden [T, H], d gate_up_w,
    d gate_up_b, d down_w, d down_b, d top_k_weights [T, k]), a gradient not asked for as an
    empty tensor. ``h``: the forward's H, or a ``hand_over`` list holding it (freed once the
    activation backward has read it)."""
    k = int(top_k_weights.shape[1])
    d_h, weighted_act, d_gate_up_b, d_down_b, d_weights = backward_act(
        grad_out, gate_up_b, down_w, down_b, top_k_weights, h, expert_offsets, sorted_slots, limit=limit,
        alpha=alpha, need_down_b=need_down_b, need_weights=need_weights, in_op=False)
    d_h = hand_over(d_h)  # the only holder: backward_up frees dH once dW1 is made, before dW2 exists
    d_hidden, d_gate_up = grad_out.new_empty(0), grad_out.new_empty(0)
    if need_hidden or need_gate_up:
        d_hidden, d_gate_up = backward_up(d_h, hidden, gate_up_w, expert_offsets, sorted_slots, k,
                                          need_hidden=need_hidden, need_gate_up=need_gate_up, in_op=False)
    del d_h
    d_down = grad_out.new_empty(0)
    if need_down:
        d_down = backward_down(grad_out, weighted_act, down_w, expert_offsets, sorted_slots, k, in_op=False)
    return d_hidden, d_gate_up, d_gate_up_b, d_down, d_down_b, d_weights


# -------------------------------------------------------------------------------------------------
# torch.library ops (the torch.compile path)
# -------------------------------------------------------------------------------------------------

def _gptoss_experts_fwd(
    hidden: torch.Tensor,
    gate_up_w: torch.Tensor,
    gate_up_b: torch.Tensor,
    down_w: torch.Tensor,
    down_b: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    limit: float,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out [T, H], H [M, 2I], expert_offsets [E+1], sorted_slots [M])."""
    return forward(hidden, gate_up_w, gate_up_b, down_w, down_b, top_k_index, top_k_weights, limit=limit,
                   alpha=alpha, in_op=True)


gptoss_experts_fwd = launch.register_op("moe_tune::gptoss_experts_fwd", _gptoss_experts_fwd)


def _gptoss_experts_bwd_act(
    grad_out: torch.Tensor,
    gate_up_b: torch.Tensor,
    down_w: torch.Tensor,
    down_b: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_out: torch.Tensor,
    expert_offsets: torch.Tensor,
    sorted_slots: torch.Tensor,
    limit: float,
    alpha: float,
    need_down_b: bool,
    need_weights: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dH, w·A, d gate_up_b, d down_b, d top_k_weights)."""
    return backward_act(grad_out, gate_up_b, down_w, down_b, top_k_weights, gate_up_out, expert_offsets,
                        sorted_slots, limit=limit, alpha=alpha, need_down_b=need_down_b, need_weights=need_weights,
                        in_op=True)


gptoss_experts_bwd_act = launch.register_backward_op("moe_tune::gptoss_experts_bwd_act",
                                                         _gptoss_experts_bwd_act)


def _gptoss_experts_bwd_up(
    d_gate_up_out: torch.Tensor,
    hidden: torch.Tensor,
    gate_up_w: torch.Tensor,
    expert_offsets: torch.Tensor,
    sorted_slots: torch.Tensor,
    topk: int,
    need_hidden: bool,
    need_gate_up: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (d hidden, d gate_up_w); one not asked for comes back as an empty tensor."""
    return backward_up(d_gate_up_out, hidden, gate_up_w, expert_offsets, sorted_slots, topk,
                       need_hidden=need_hidden, need_gate_up=need_gate_up, in_op=True)


gptoss_experts_bwd_up = launch.register_backward_op("moe_tune::gptoss_experts_bwd_up",
                                                        _gptoss_experts_bwd_up)


def _gptoss_experts_bwd_down(
    grad_out: torch.Tensor,
    weighted_act: torch.Tensor,
    down_w: torch.Tensor,
    expert_offsets: torch.Tensor,
    sorted_slots: torch.Tensor,
    topk: int,
) -> torch.Tensor:
    """Returns d down_w."""
    return backward_down(grad_out, weighted_act, down_w, expert_offsets, sorted_slots, topk, in_op=True)


gptoss_experts_bwd_down = launch.register_backward_op("moe_tune::gptoss_experts_bwd_down",
                                                          _gptoss_experts_bwd_down)

# needs_input_grad positions of the forward op's and the eager Function's inputs
_HIDDEN, _GATE_UP, _GATE_UP_B, _DOWN, _DOWN_B, _WEIGHTS = 0, 1, 2, 3, 4, 6


def _needs(needs_input_grad) -> dict[str, bool]:
    return dict(need_hidden=needs_input_grad[_HIDDEN], need_gate_up=needs_input_grad[_GATE_UP],
                need_down=needs_input_grad[_DOWN], need_down_b=needs_input_grad[_DOWN_B],
                need_weights=needs_input_grad[_WEIGHTS])


def _input_grads(needs_input_grad, grads) -> tuple:
    """The backward's six gradients placed at their inputs' positions, None where not wanted."""
    out = [None] * len(needs_input_grad)
    for position, grad in zip((_HIDDEN, _GATE_UP, _GATE_UP_B, _DOWN, _DOWN_B, _WEIGHTS), grads):
        if needs_input_grad[position]:
            out[position] = grad
    return tuple(out)


def _setup_context(ctx, inputs, output) -> None:
    hidden, gate_up_w, gate_up_b, down_w, down_b, top_k_index, top_k_weights, limit, alpha = inputs
    _out, gate_up_out, expert_offsets, sorted_slots = output
    ctx.mark_non_differentiable(gate_up_out, expert_offsets, sorted_slots)
    ctx.save_for_backward(hidden, gate_up_w, gate_up_b, down_w, down_b, top_k_weights, gate_up_out,
                          expert_offsets, sorted_slots)
    ctx.limit, ctx.alpha = limit, alpha


def _op_backward(ctx, grad_out, _grad_gate_up_out, _grad_offsets, _grad_slots):
    """Three ops, so that the graph drops H after the first and dH after the second (the eager
    body's order, ``backward``)."""
    hidden, gate_up_w, gate_up_b, down_w, down_b, top_k_weights, gate_up_out, offsets, slots = ctx.saved_tensors
    needs = _needs(ctx.needs_input_grad)
    topk = top_k_weights.shape[1]
    d_h, weighted_act, d_gate_up_b, d_down_b, d_weights = gptoss_experts_bwd_act(
        grad_out, gate_up_b, down_w, down_b, top_k_weights, gate_up_out, offsets, slots, ctx.limit, ctx.alpha,
        needs["need_down_b"], needs["need_weights"])
    d_hidden = d_gate_up = d_down = None
    if needs["need_hidden"] or needs["need_gate_up"]:
        d_hidden, d_gate_up = gptoss_experts_bwd_up(d_h, hidden, gate_up_w, offsets, slots, topk,
                                                    needs["need_hidden"], needs["need_gate_up"])
    if needs["need_down"]:
        d_down = gptoss_experts_bwd_down(grad_out, weighted_act, down_w, offsets, slots, topk)
    return _input_grads(ctx.needs_input_grad, (d_hidden, d_gate_up, d_gate_up_b, d_down, d_down_b, d_weights))


gptoss_experts_fwd.register_autograd(_op_backward, setup_context=_setup_context)


# -------------------------------------------------------------------------------------------------
# Eager path and the public function
# -------------------------------------------------------------------------------------------------


class _EagerBlock(torch.autograd.Function):
    """The block outside torch.compile: the bodies run as plain Python, kernels launched eagerly.
    H is handed over to the backward (``block.hand_over``) rather than saved, so the backward frees
    it once the activation backward has read it. Under saved-tensor hooks (non-reentrant
    checkpointing, offloading) it is saved like the rest."""

    @staticmethod
    def forward(ctx, hidden, gate_up_w, gate_up_b, down_w, down_b, top_k_index, top_k_weights, limit, alpha):
        out, h, offsets, slots = forward(hidden, gate_up_w, gate_up_b, down_w, down_b, top_k_index, top_k_weights,
                                         limit=limit, alpha=alpha, in_op=False)
        ctx.handed = hands_over()
        ctx.save_for_backward(hidden, gate_up_w, gate_up_b, down_w, down_b, top_k_weights, offsets, slots,
                              *(() if ctx.handed else (h,)))
        ctx.h = hand_over(h) if ctx.handed else None
        ctx.limit, ctx.alpha = limit, alpha
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, gate_up_w, gate_up_b, down_w, down_b, top_k_weights, offsets, slots, *kept = ctx.saved_tensors
        h = claim(ctx, "h") if ctx.handed else kept[0]
        grads = backward(grad_out, hidden, gate_up_w, gate_up_b, down_w, down_b, top_k_weights, h,
                         offsets, slots, limit=ctx.limit, alpha=ctx.alpha, **_needs(ctx.needs_input_grad))
        return _input_grads(ctx.needs_input_grad, grads)


def _fail(message: str) -> None:
    raise InvalidInputError(message)


def check_inputs(hidden, gate_up_w, gate_up_b, down_w, down_b, top_k_index, top_k_weights, limit, alpha) -> None:
    """``InvalidInputError`` saying what is wrong unless the block's tensors and constants fit
    (shapes, dtypes, devices: metadata only)."""
    named = (("hidden", hidden), ("gate_up_w", gate_up_w), ("gate_up_b", gate_up_b), ("down_w", down_w),
             ("down_b", down_b), ("top_k_index", top_k_index), ("top_k_weights", top_k_weights))
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, value in (("limit", limit), ("alpha", alpha)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(f"{name} must be a number, got {value!r}")
    if not limit > 0:
        _fail(f"limit must be positive, got {limit}")
    if hidden.dim() != 2:
        _fail(f"hidden must be [T, H], got shape {list(hidden.shape)}")
    T, H = hidden.shape
    if gate_up_w.dim() != 3 or gate_up_w.shape[1] != H or gate_up_w.shape[2] % 2:
        _fail(f"gate_up_w must be [E, H, 2I] with H={H}, got {list(gate_up_w.shape)}")
    E, _, two_i = gate_up_w.shape
    I = two_i // 2
    if tuple(down_w.shape) != (E, I, H):
        _fail(f"down_w must be [E, I, H] = {[E, I, H]}, got {list(down_w.shape)}")
    if tuple(gate_up_b.shape) != (E, two_i):
        _fail(f"gate_up_b must be [E, 2I] = {[E, two_i]}, got {list(gate_up_b.shape)}")
    if tuple(down_b.shape) != (E, H):
        _fail(f"down_b must be [E, H] = {[E, H]}, got {list(down_b.shape)}")
    check_routing_args(top_k_index, top_k_weights, T, E)
    for name, t in named:
        if name != "top_k_index" and t.dtype not in _FLOAT_DTYPES:
            _fail(f"{name} must be bfloat16, float16 or float32, got {t.dtype}")
    if gate_up_w.dtype != hidden.dtype or down_w.dtype != hidden.dtype:
        _fail(f"hidden, gate_up_w and down_w must share a dtype, got {hidden.dtype}, {gate_up_w.dtype}, "
              f"{down_w.dtype} (cast the activations to the weights' dtype first)")
    for name, t in named[1:]:
        if t.device != hidden.device:
            _fail(f"{name} is on {t.device} but hidden is on {hidden.device}")


def gptoss_experts(
    hidden: torch.Tensor,
    gate_up_w: torch.Tensor,
    gate_up_b: torch.Tensor,
    down_w: torch.Tensor,
    down_b: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    *,
    limit: float,
    alpha: float,
) -> torch.Tensor:
    """transformers' ``GptOssExperts`` forward: ``out[t] = Σ_j w[t,j]·(act(x_t·W1[e] + b1[e])·W2[e] + b2[e])``,
    ``e = top_k_index[t, j]``, ``act`` the interleaved clamped SwiGLU.

    Args:
        hidden: ``[T, H]`` token activations.
        gate_up_w: ``[E, H, 2I]`` (stored ``[K, N]``); column 2j is gate j, column 2j+1 up j.
        gate_up_b: ``[E, 2I]``, interleaved like ``gate_up_w``'s columns.
        down_w: ``[E, I, H]``.
        down_b: ``[E, H]``; added before the routing weight multiplies, as transformers does.
        top_k_index: ``[T, k]`` expert ids (int32 or int64), each in ``[0, E)``.
        top_k_weights: ``[T, k]`` routing weights.
        limit, alpha: the module's ``limit`` and ``alpha`` (config ``swiglu_limit``, ``swiglu_alpha``).

    Returns ``[T, H]`` in ``hidden``'s dtype. Gradients flow to ``hidden``, both weights, both
    biases and ``top_k_weights``; the activation passes none where a value was clamped.
    """
    check_inputs(hidden, gate_up_w, gate_up_b, down_w, down_b, top_k_index, top_k_weights, limit, alpha)
    args = tuple(t.contiguous() for t in (hidden, gate_up_w, gate_up_b, down_w, down_b, top_k_index, top_k_weights))
    if torch.compiler.is_compiling():
        return gptoss_experts_fwd(*args, float(limit), float(alpha))[0]
    return _EagerBlock.apply(*args, float(limit), float(alpha))
