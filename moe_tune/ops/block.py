"""The experts block's forward and backward bodies, shared by the eager autograd path
(``moe_tune.ops.moe_experts``) and the torch.library ops that torch.compile traces
(``moe_tune.ops.custom_ops``).

Data flow, with T tokens, k slots per token, M = T·k routed rows, w the routing weights:

forward
    routing     = build_routing(top_k_index)            expert_offsets [E+1], sorted_slots [M]
    H [M, 2I]   = X[slot // k] · W1[e]ᵀ                 up GEMM, gathered on load, expert order
    A [M, I]    = silu(H_gate) · H_up                   SwiGLU kernel
    Y [M, H]    = w[slot] · A · W2[e]ᵀ                  down GEMM, scattered to slot order
    out[t]      = Σ_j Y[t·k + j]                         slot_sum kernel (float32 accumulation)
    saved: X, H, routing (A is recomputed; the down output is never kept)

backward (G = d out [T, H])
    dA_raw      = G[slot // k] · W2[e]                  down dx, gathered on load, unweighted
    dH, wA, dS  = SwiGLU backward(H, dA_raw, w)         dA = w·dA_raw; wA = w·A over dA_raw;
                                                        dS[slot] = ⟨dA_raw, A⟩; H is freed here
    dX          = Σ_j (dH · W1[e])[t·k + j]             up dx, scattered to slot order, summed
    dW1[e]      = dH_eᵀ · X_s,e                         X_s = X's rows copied to expert order
    dW2[e]      = G_s,eᵀ · wA_e                         G_s = G's rows copied to expert order, so
                                                        both operands stream through TMA

The backward runs in three parts — ``backward_act`` (down dx, SwiGLU backward), ``backward_up``
(up dx, dW1), ``backward_down`` (dW2) — eager in one call (``backward``), under torch.compile as
three ops, so that between them the caller (the eager body, Inductor's graph) drops what the next
part does not read. That order keeps the peak low: H goes as soon as the SwiGLU backward has read
it (the eager path hands it over instead of saving it, ``hand_over``, unless saved-tensor hooks such
as a non-reentrant checkpoint's are active, ``hands_over``), dH goes once dW1 is made, and the
larger weight gradient (dW1) is made while dW2 does not exist yet; at the end only the gradients,
wA and G_s are live. (As one backward op, H lived to the end under torch.compile: 2753 MiB against
1985 eager at 16384 tokens, H100.)

The row copies (``gather_rows``: 0.20 ms each at 16k tokens on an H200, where ``index_select`` took
0.27) lift both dW from gathered-row rates (331-391 TFLOP/s) to TMA rates (500-560); each lives
only while its dW runs. Running them on a side stream beside the down dx GEMM was tried: the
GEMM's persistent programs fill every SM, so the copies ran after it (BENCHMARKS.md). Every config
comes from the runtime loader for the six problems of ``MoeShape.problems()`` (memoised dict
hits); nothing here reads device memory on the host, so both bodies run under CUDA-graph capture
and ``set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import functools

import torch

from moe_tune import runtime
from moe_tune.device import DeviceInfo, query_device
from moe_tune.kernels.swiglu import swiglu_backward_kernel, swiglu_forward_kernel
from moe_tune.ops import launch
from moe_tune.ops.launch import size_hint
from moe_tune.ops.grouped_gemm import DTYPE_NAMES
from moe_tune.ops.routing import Routing, build_routing
from moe_tune.ops.rows import gather_rows, slot_sum
from moe_tune.problem import KernelConfig, MoeShape, Problem
from moe_tune.space import check_config

ACTIVATIONS = ("silu",)


def _alloc(shape, dtype, device) -> torch.Tensor:
    """Every buffer a body writes through a kernel comes from here (the tests poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def hands_over() -> bool:
    """Whether the eager forward may hand buffers over (``hand_over``) rather than save them: not
    while saved-tensor hooks are active (non-reentrant activation checkpointing, activation
    offloading), which must see every tensor the backward needs to do their work (a handed-over
    buffer would stay alive from forward to backward under a checkpoint)."""
    top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top_hooks is not None and top_hooks(False) is None


def hand_over(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Wrap a buffer the eager forward keeps for its backward (on ``ctx``, not through
    ``save_for_backward``) so that the backward can free it as soon as it has read it: the list
    is the only holder, and ``take`` empties it."""
    return [tensor]


def take(ref) -> torch.Tensor:
    """The tensor ``ref`` stands for: itself, or the item of a ``hand_over`` list, removed from
    it so that the taker's ``del`` frees the buffer."""
    return ref.pop() if isinstance(ref, list) else ref


def claim(ctx, name: str):
    """Take ``ctx.<name>`` (a ``hand_over`` list) for the one backward allowed through it."""
    held = getattr(ctx, name, None)
    if not held:
        raise RuntimeError("moe-tune's experts block frees its activations during backward, so it cannot be "
                           "backpropagated through a second time (retain_graph=True); run the forward again")
    setattr(ctx, name, None)
    return held


def problem_dims(gate_up_w: torch.Tensor, topk) -> tuple[int, int, int, int]:
    """(E, H, I, k) as ints: they name the tuning problems and are kernel constexprs, so a
    symbolic one is specialised (a guard) rather than hinted."""
    E, two_i, H = (int(d) for d in gate_up_w.shape)
    return E, H, two_i // 2, int(topk)


@functools.lru_cache(maxsize=256)
def _problems(E: int, H: int, I: int, topk: int, dtype: str) -> dict[tuple[str, str], Problem]:
    return {(p.gemm, p.pass_): p for p in MoeShape(E, H, I, topk).problems(dtype)}


_checked: set[tuple[Problem, KernelConfig, DeviceInfo]] = set()


def resolve_config(problem: Problem, num_tokens: int, info: DeviceInfo) -> KernelConfig:
    """The runtime loader's config for ``problem``, checked against the device once per
    (problem, config, device): the block's one way to a config (a memoised dict hit when warm)."""
    config = runtime.get_config(problem, num_tokens, device=info)
    key = (problem, config, info)
    if key not in _checked:
        check_config(problem, config, info)
        _checked.add(key)
    return config


_BLOCK_CONFIGS: dict[tuple, dict[tuple[str, str], KernelConfig]] = {}
_BLOCK_CONFIGS_LIMIT = 4096  # distinct (shape, token count) keys kept; refilling costs microseconds


def configs_for(problems_of, E: int, H: int, I: int, topk: int, dtype: torch.dtype, num_tokens: int,
                info: DeviceInfo, *extra) -> dict:
    """``{name: KernelConfig}`` for the problems ``problems_of(E, H, I, topk, dtype name,
    *extra)`` returns (a layout's, by name; ``extra``: the LoRA blocks' ranks), from the runtime
    loader: one dict hit per pass when warm, keyed on ``runtime.generation()`` so that a cache
    reset or a new cache directory is seen at once."""
    key = (problems_of, E, H, I, topk, dtype, num_tokens, info, runtime.generation(), *extra)
    found = _BLOCK_CONFIGS.get(key)
    if found is None:
        problems = problems_of(E, H, I, topk, DTYPE_NAMES[dtype], *extra)
        found = {name: resolve_config(problem, num_tokens, info) for name, problem in problems.items()}
        if len(_BLOCK_CONFIGS) >= _BLOCK_CONFIGS_LIMIT:
            _BLOCK_CONFIGS.clear()
        _BLOCK_CONFIGS[key] = found
    return found


def block_configs(E: int, H: int, I: int, topk: int, dtype: torch.dtype, num_tokens: int,
                  info: DeviceInfo) -> dict[tuple[str, str], KernelConfig]:
    """``{(gemm, pass): KernelConfig}`` for the block's six problems (``configs_for``)."""
    return configs_for(_problems, E, H, I, topk, dtype, num_tokens, info)


def part_context(configs_of, E: int, H: int, I: int, k: int, T, dtype: torch.dtype, device: torch.device,
                 expert_offsets: torch.Tensor, sorted_slots: torch.Tensor) -> tuple[DeviceInfo, dict, Routing]:
    """(device info, ``configs_of``'s configs, the forward's Routing) for one backward part:
    each part runs as its own op under torch.compile, so each looks them up (dict hits)."""
    info = query_device(device)
    return (info, configs_of(E, H, I, k, dtype, size_hint(T), info),
            Routing(expert_offsets, sorted_slots, T, k))


# SwiGLU tiles: 4096 elements a program keeps 32 per thread at 4 warps, enough loads in flight
# for a memory-bound pass; the I chunk stays at most 256 wide.
_SWIGLU_TILE = 4096
_SWIGLU_MAX_I = 256


def _swiglu_blocks(inter: int) -> tuple[int, int]:
    block_i = min(launch.next_power_of_2(inter), _SWIGLU_MAX_I)
    return _SWIGLU_TILE // block_i, block_i


def swiglu_forward(h: torch.Tensor, act: torch.Tensor, *, delta: torch.Tensor | None = None,
                   in_op: bool = False) -> None:
    """``act = silu(h_gate)·h_up`` ([M, 2I] → [M, I]); with ``delta``, ``h += delta`` first."""
    M, I = act.shape
    block_m, block_i = _swiglu_blocks(I)
    other = delta if delta is not None else h
    launch.launch_kernel(swiglu_forward_kernel, in_op, (launch.cdiv(M, block_m), launch.cdiv(I, block_i)),
                         (h, other, act, M, I, h.stride(0), other.stride(0), act.stride(0)),
                         dict(HAS_DELTA=delta is not None, BLOCK_M=block_m, BLOCK_N=block_i, num_warps=4),
                         (h, act))


def swiglu_backward(d_act: torch.Tensor, h: torch.Tensor, weights: torch.Tensor, sorted_slots: torch.Tensor,
                    d_h: torch.Tensor, d_weights: torch.Tensor, *, lora: tuple | None = None,
                    in_op: bool = False) -> None:
    """SwiGLU's backward over expert-ordered rows: ``d_h`` [M, 2I] and the per-slot routing-weight
    gradient ``d_weights`` [M] out, ``w·A`` written over ``d_act`` (dA_raw in). ``lora``:
    (dA_lora [M, I], P [M, R], L2 [M, R]) of ``moe_tune.ops.lora_block``."""
    M, I = d_act.shape
    block_m, block_i = _swiglu_blocks(I)
    d_lora, p, l2 = lora if lora is not None else (d_act, d_act, d_act)
    rank = p.shape[1] if lora is not None else 0
    launch.launch_kernel(
        swiglu_backward_kernel, in_op, (launch.cdiv(M, block_m),),
        (d_act, d_lora, h, d_h, weights, sorted_slots, p, l2, d_weights, M, I, rank,
         d_act.stride(0), d_lora.stride(0), h.stride(0), d_h.stride(0), p.stride(0), l2.stride(0)),
        dict(LORA=lora is not None, BLOCK_M=block_m, BLOCK_N=block_i,
             BLOCK_R=max(16, launch.next_power_of_2(rank)), num_warps=4),
        (d_act, d_h, d_weights))


# -------------------------------------------------------------------------------------------------
# Forward
# -------------------------------------------------------------------------------------------------


def forward(hidden: torch.Tensor, gate_up_w: torch.Tensor, down_w: torch.Tensor, top_k_index: torch.Tensor,
            top_k_weights: torch.Tensor, *, in_op: bool):
    """Returns (out [T, H], H [M, 2I], expert_offsets, sorted_slots); all but ``out`` are what the
    backward needs."""
    E, H, I, k = problem_dims(gate_up_w, top_k_index.shape[1])
    T = hidden.shape[0]
    M = T * k
    device, dtype = hidden.device, hidden.dtype
    info = query_device(device)
    cfg = block_configs(E, H, I, k, dtype, size_hint(T), info)
    routing = build_routing(top_k_index, E, in_op=in_op)

    # -- Up GEMM: token rows gathered on load, output in expert order, then SwiGLU ----------------
    h = _alloc((M, 2 * I), dtype, device)
    launch.grouped_mm(hidden, gate_up_w, h, routing, None, trans_w=False, gather_a=True, gather_div=k,
                      scatter_c=False, cfg=cfg["up", "forward"], info=info, in_op=in_op)
    act = _alloc((M, I), dtype, device)
    swiglu_forward(h, act, in_op=in_op)

    # -- Down GEMM: routing weight in the epilogue, rows stored in slot order, then summed ---------
    down_out = _alloc((M, H), dtype, device)
    launch.grouped_mm(act, down_w, down_out, routing, top_k_weights.reshape(M), trans_w=False, gather_a=False,
                      gather_div=1, scatter_c=True, cfg=cfg["down", "forward"], info=info, in_op=in_op)
    out = slot_sum(down_out, k, _alloc((T, H), dtype, device), in_op=in_op)
    return out, h, routing.expert_offsets, routing.sorted_slots


# -------------------------------------------------------------------------------------------------
# Backward
# -------------------------------------------------------------------------------------------------


def backward_act(grad_out: torch.Tensor, down_w: torch.Tensor, top_k_weights: torch.Tensor, h,
                 expert_offsets: torch.Tensor, sorted_slots: torch.Tensor, *, in_op: bool):
    """Down dx and the SwiGLU backward: returns (w·A [M, I], dH [M, 2I], d top_k_weights [T, k]).
    ``h``: the forward's H, or a ``hand_over`` list holding it (then freed once read)."""
    E, H, I = (int(d) for d in down_w.shape)
    k = int(top_k_weights.shape[1])
    T = grad_out.shape[0]
    M = T * k
    device, dtype = grad_out.device, down_w.dtype
    info, cfg, routing = part_context(block_configs, E, H, I, k, T, dtype, device, expert_offsets, sorted_slots)
    h = take(h)

    # -- Down dx, unweighted, reading G's token rows directly: dA_raw in expert order -------------
    d_act = _alloc((M, I), dtype, device)  # dA_raw, then w·A
    launch.grouped_mm(grad_out.contiguous(), down_w, d_act, routing, None, trans_w=True, gather_a=True,
                      gather_div=k, scatter_c=False, cfg=cfg["down", "dx"], info=info, in_op=in_op)

    # -- SwiGLU backward: dH, the routing-weight gradient, and w·A over dA_raw ---------------------
    d_h = _alloc((M, 2 * I), dtype, device)
    d_weights = _alloc((T, k), top_k_weights.dtype, device)
    swiglu_backward(d_act, h, top_k_weights.reshape(M), sorted_slots, d_h, d_weights, in_op=in_op)
    return d_act, d_h, d_weights


def expert_rows(t: torch.Tensor, sorted_slots: torch.Tensor, topk: int, *, in_op: bool = False) -> torch.Tensor:
    """``t``'s token rows [T, ·] copied to expert order [M, ·]: a dW's operand, streamed through TMA."""
    return gather_rows(t, sorted_slots, topk, _alloc((sorted_slots.shape[0], t.shape[1]), t.dtype, t.device),
                       in_op=in_op)


def weight_grad(dy_rows: torch.Tensor, x_rows: torch.Tensor, weight: torch.Tensor, routing: Routing,
                cfg: KernelConfig, info: DeviceInfo, *, in_op: bool) -> torch.Tensor:
    """dW[e] = dY_eᵀ·X_e over rows already in expert order, into a fresh tensor shaped like
    ``weight``: the two dW GEMMs of the block (dY = dH, X = X_s for the up weights; dY = G_s,
    X = w·A for the down weights)."""
    d_weight = _alloc(tuple(weight.shape), weight.dtype, weight.device)
    launch.grouped_mm_dw(dy_rows, x_rows, d_weight, routing, None, gather_dy=False, dy_div=1, gather_x=False,
                         x_div=1, cfg=cfg, info=info, in_op=in_op)
    return d_weight


def backward_up(d_h, hidden: torch.Tensor, gate_up_w: torch.Tensor, expert_offsets: torch.Tensor,
                sorted_slots: torch.Tensor, topk: int, *, need_hidden: bool, need_gate_up: bool, in_op: bool,
                x_sorted: torch.Tensor | None = None):
    """Up dx and up dW: returns (d hidden [T, H], d gate_up_w), one not asked for as an empty
    tensor. ``d_h``: dH, or a ``hand_over`` list holding it (then freed once dW1 is made).
    ``x_sorted``: ``expert_rows(hidden)`` when the caller has it."""
    E, H, I, k = problem_dims(gate_up_w, topk)
    T = hidden.shape[0]
    M = T * k
    device, dtype = hidden.device, gate_up_w.dtype
    info, cfg, routing = part_context(block_configs, E, H, I, k, T, dtype, device, expert_offsets, sorted_slots)
    d_h = take(d_h)

    # -- Up dx: rows scattered to slot order, then the k slots of a token summed -----------------
    d_hidden = hidden.new_empty(0)
    if need_hidden:
        d_rows = _alloc((M, H), dtype, device)
        launch.grouped_mm(d_h, gate_up_w, d_rows, routing, None, trans_w=True, gather_a=False, gather_div=1,
                          scatter_c=True, cfg=cfg["up", "dx"], info=info, in_op=in_op)
        d_hidden = slot_sum(d_rows, k, _alloc((T, H), dtype, device), in_op=in_op)
        # Free the M·H slot rows before dW1's E·2I·H buffer exists.
        del d_rows

    # -- Up dW: expert-ordered dH against X's rows copied to expert order --------------------------
    d_gate_up = hidden.new_empty(0)
    if need_gate_up:
        if x_sorted is None:
            x_sorted = expert_rows(hidden, sorted_slots, k, in_op=in_op)
        d_gate_up = weight_grad(d_h, x_sorted, gate_up_w, routing, cfg["up", "dw"], info, in_op=in_op)
    return d_hidden, d_gate_up


def backward_down(grad_out: torch.Tensor, d_act: torch.Tensor, down_w: torch.Tensor, expert_offsets: torch.Tensor,
                  sorted_slots: torch.Tensor, topk: int, *, in_op: bool,
                  g_sorted: torch.Tensor | None = None) -> torch.Tensor:
    """Down dW: G's rows copied to expert order against w·A (``backward_act``'s first output).
    ``g_sorted``: ``expert_rows(grad_out)`` when the caller has it."""
    E, H, I = (int(d) for d in down_w.shape)
    k = int(topk)
    T = grad_out.shape[0]
    device, dtype = grad_out.device, down_w.dtype
    info, cfg, routing = part_context(block_configs, E, H, I, k, T, dtype, device, expert_offsets, sorted_slots)
    if g_sorted is None:
        g_sorted = expert_rows(grad_out, sorted_slots, k, in_op=in_op)
    return weight_grad(g_sorted, d_act, down_w, routing, cfg["down", "dw"], info, in_op=in_op)


def backward(grad_out: torch.Tensor, hidden: torch.Tensor, gate_up_w: torch.Tensor, down_w: torch.Tensor,
             top_k_weights: torch.Tensor, h, expert_offsets: torch.Tensor, sorted_slots: torch.Tensor,
             *, need_hidden: bool, need_gate_up: bool, need_down: bool):
    """The eager backward, the three parts in order: returns (d hidden [T, H], d gate_up_w,
    d down_w, d top_k_weights [T, k]), a gradient not asked for as an empty tensor. ``h``: the
    forward's H, or a ``hand_over`` list holding it (then freed once read)."""
    k = int(top_k_weights.shape[1])
    grad_out = grad_out.contiguous()
    d_act, d_h, d_weights = backward_act(grad_out, down_w, top_k_weights, h, expert_offsets, sorted_slots,
                                         in_op=False)
    d_h = hand_over(d_h)  # the only holder: backward_up frees dH once dW1 is made, before dW2 exists
    d_hidden, d_gate_up = grad_out.new_empty(0), grad_out.new_empty(0)
    if need_hidden or need_gate_up:
        d_hidden, d_gate_up = backward_up(d_h, hidden, gate_up_w, expert_offsets, sorted_slots, k,
                                          need_hidden=need_hidden, need_gate_up=need_gate_up, in_op=False)
    del d_h
    d_down = grad_out.new_empty(0)
    if need_down:
        d_down = backward_down(grad_out, d_act, down_w, expert_offsets, sorted_slots, k, in_op=False)
    return d_hidden, d_gate_up, d_down, d_weights
