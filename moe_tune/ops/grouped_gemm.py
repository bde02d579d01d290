"""Launchers and autograd for the grouped-GEMM kernels.

Data flow: a caller hands tensors plus a ``Routing`` (see ``moe_tune.ops.routing``) and the forward
GEMM's layout flags; the launcher validates them (``InvalidInputError``, a ``ValueError``, for a
caller's mistake), describes the call as a ``Problem``, takes the config the caller passed or asks
the runtime loader for one (a memoised cache lookup, never a benchmark), checks it against the
device, allocates the output and launches one persistent grid.

Layouts, with M = T·k routed rows, ``W[E, N, K]``:

=========  ===================================  =====================================
pass       input                                output
=========  ===================================  =====================================
forward    X ``[T, K]`` if gather else ``[M, K]``  Y ``[M, N]``: slot order if scatter,
                                                 else expert order
dx         dY in Y's layout                      dX in X's layout (token order summed
                                                 over the k slots when gathering)
dw         dY in Y's layout, X in X's layout     dW ``[E, N, K]``
=========  ===================================  =====================================

``weights`` (``[M]``, one routing weight per token slot ``t·k + j``) multiplies the forward output
rows; dx and dw apply it too, so the three passes stay each other's exact gradients.
"""

from __future__ import annotations

from typing import Mapping

import torch

from moe_tune.device import DeviceInfo, query_device
from moe_tune.errors import InvalidInputError
from moe_tune.ops import launch
from moe_tune.ops.routing import Routing
from moe_tune.ops.rows import slot_sum
from moe_tune.problem import KernelConfig, Problem
from moe_tune.space import check_config

DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


# -------------------------------------------------------------------------------------------------
# Validation
# -------------------------------------------------------------------------------------------------


def _fail(message: str) -> None:
    raise InvalidInputError(message)


def _check_tensor(name: str, t, shape: tuple, device: torch.device, dtype=None) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        _fail(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if t.device != device:
        _fail(f"{name} is on {t.device} but the weights are on {device}")
    if dtype is not None and t.dtype != dtype:
        _fail(f"{name} must be {dtype}, got {t.dtype}")
    if t.numel() and not t.is_contiguous():
        _fail(f"{name} must be contiguous (call .contiguous() first)")


def _check_routing(routing: Routing, num_experts: int, device: torch.device) -> None:
    if not isinstance(routing, Routing):
        _fail(f"routing must be a moe_tune.ops.routing.Routing, got {type(routing).__name__}")
    if routing.num_experts != num_experts:
        _fail(f"routing covers {routing.num_experts} experts but the weight has {num_experts}")
    if routing.topk > num_experts:
        _fail(f"topk ({routing.topk}) exceeds the number of experts ({num_experts})")
    rows = routing.num_tokens * routing.topk
    _check_tensor("routing.expert_offsets", routing.expert_offsets, (num_experts + 1,), device, torch.int32)
    _check_tensor("routing.sorted_slots", routing.sorted_slots, (rows,), device, torch.int32)
    if device.type == "cpu":
        # Cheap only where no device sync is involved (the interpreter's CPU tensors).
        offs = routing.expert_offsets
        if offs[0].item() != 0 or offs[-1].item() != rows or bool((offs[1:] < offs[:-1]).any()):
            _fail(f"routing.expert_offsets must rise from 0 to {rows}")
        if rows and (routing.sorted_slots.min().item() < 0 or routing.sorted_slots.max().item() >= rows):
            _fail(f"routing.sorted_slots must hold slot ids in [0, {rows})")


def _check_weight(w) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 3:
        _fail(f"w must be a [E, N, K] tensor, got {getattr(w, 'shape', type(w).__name__)}")
    if w.dtype not in DTYPE_NAMES:
        _fail(f"w must be bfloat16, float16 or float32, got {w.dtype}")
    if not (w.is_contiguous() or _compile_only_stack(w)):
        _fail("w must be contiguous (call .contiguous() first)")


def _compile_only_stack(t) -> bool:
    """An expert stack whose E views share one expert's memory (``ops.problems.expanded``): valid
    only for launches that run nothing, i.e. under ``launch.compile_only()``."""
    return launch.compiling_only() and t.dim() == 3 and t.stride(0) == 0 and t[0].is_contiguous()


def _check_weights_vector(weights, rows: int, device: torch.device) -> None:
    if weights is None:
        return
    if not isinstance(weights, torch.Tensor) or not weights.is_floating_point():
        _fail("weights must be a floating-point tensor of one routing weight per token slot")
    _check_tensor("weights", weights, (rows,), device)


def _output(name: str, out, shape: tuple, dtype, device: torch.device) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if _compile_only_stack(out) and tuple(out.shape) == tuple(shape) and out.dtype == dtype:
        return out
    _check_tensor(name, out, shape, device, dtype)
    return out


def _problem(pass_: str, w: torch.Tensor, routing: Routing, gather: bool, scatter: bool, weighted: bool) -> Problem:
    E, N, K = w.shape
    return Problem(pass_, E, N, K, routing.topk, DTYPE_NAMES[w.dtype], gather, scatter, weighted)


def _resolve(problem: Problem, config: KernelConfig | None, routing: Routing, device: DeviceInfo) -> KernelConfig:
    if config is None:
        from moe_tune import runtime

        config = runtime.get_config(problem, routing.num_tokens, device=device)
    elif not isinstance(config, KernelConfig):
        _fail(f"config must be a KernelConfig, got {type(config).__name__}")
    check_config(problem, config, device)
    return config


def forward(x, w, routing: Routing, *, gather=False, scatter=False, weights=None,
            config: KernelConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Y = X·W[e]ᵀ per expert (see the module docstring for layouts); ``out`` ``[M, N]`` is
    written in place when given."""
    _check_weight(w)
    _check_routing(routing, w.shape[0], w.device)
    E, N, K = w.shape
    rows = routing.num_rows
    _check_tensor("x", x, (routing.num_tokens if gather else rows, K), w.device, w.dtype)
    _check_weights_vector(weights, rows, w.device)
    info = query_device(w.device)
    cfg = _resolve(_problem("forward", w, routing, gather, scatter, weights is not None), config, routing, info)
    y = _output("out", out, (rows, N), w.dtype, w.device)
    if rows:
        launch.grouped_mm(x, w, y, routing, weights, trans_w=False, gather_a=gather, gather_div=routing.topk,
                   scatter_c=scatter, cfg=cfg, info=info)
    return y


def backward_dx(dy, w, routing: Routing, *, gather=False, scatter=False, weights=None,
                config: KernelConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """dX = dY·W[e] per expert, returned in the forward input's layout. ``out`` ``[M, K]``
    receives the per-slot rows (slot order when gathering, before the sum over k)."""
    _check_weight(w)
    _check_routing(routing, w.shape[0], w.device)
    E, N, K = w.shape
    rows = routing.num_rows
    _check_tensor("dy", dy, (rows, N), w.device, w.dtype)
    _check_weights_vector(weights, rows, w.device)
    info = query_device(w.device)
    cfg = _resolve(_problem("dx", w, routing, gather, scatter, weights is not None), config, routing, info)
    # Gathered forward input: write each slot's row in slot order, then sum the k slots of a token.
    d_rows = _output("out", out, (rows, K), w.dtype, w.device)
    if rows:
        launch.grouped_mm(dy, w, d_rows, routing, weights, trans_w=True, gather_a=scatter, gather_div=1,
                   scatter_c=gather, cfg=cfg, info=info)
    if gather:
        return slot_sum(d_rows, routing.topk)
    return d_rows


def backward_dw(dy, x, w_shape, routing: Routing, *, gather=False, scatter=False, weights=None,
                dtype=None, config: KernelConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """dW[e] = dY_eᵀ·X_e, shape ``w_shape`` = (E, N, K); ``out`` is written in place when given."""
    E, N, K = w_shape
    if not isinstance(dy, torch.Tensor) or not isinstance(x, torch.Tensor):
        _fail("dy and x must be tensors")
    device = dy.device
    dtype = dtype or dy.dtype
    if dtype not in DTYPE_NAMES:
        _fail(f"dtype must be bfloat16, float16 or float32, got {dtype}")
    _check_routing(routing, E, device)
    rows = routing.num_rows
    _check_tensor("dy", dy, (rows, N), device, dtype)
    _check_tensor("x", x, (routing.num_tokens if gather else rows, K), device, dtype)
    _check_weights_vector(weights, rows, device)
    info = query_device(device)
    problem = Problem("dw", E, N, K, routing.topk, DTYPE_NAMES[dtype], gather, scatter, weights is not None)
    cfg = _resolve(problem, config, routing, info)
    dw = _output("out", out, (E, N, K), dtype, device)
    launch.grouped_mm_dw(dy, x, dw, routing, weights, gather_dy=scatter, dy_div=1, gather_x=gather, x_div=routing.topk,
               cfg=cfg, info=info)
    return dw


# -------------------------------------------------------------------------------------------------
# Autograd
# -------------------------------------------------------------------------------------------------


def _rows_to_slots(values: torch.Tensor, routing: Routing, scatter: bool) -> torch.Tensor:
    """Per-row values of Y's layout → per-slot values (identity when Y is in slot order)."""
    if scatter:
        return values
    out = torch.empty_like(values)
    out[routing.sorted_slots.long()] = values
    return out


class _GroupedGemm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, weights, routing, gather, scatter, configs):
        fused_weights = weights if weights is not None and not weights.requires_grad else None
        config = configs.get("forward")
        if config is None and weights is not None and fused_weights is None:
            # The unweighted launch below is the weighted problem's kernel minus its epilogue
            # multiply: take the config tuned for the weighted problem (what the sweep tunes and
            # the cache holds) instead of missing the cache on a problem nobody tunes.
            from moe_tune import runtime

            config = runtime.get_config(_problem("forward", w, routing, gather, scatter, True),
                                        routing.num_tokens, device=query_device(w.device))
        y = forward(x, w, routing, gather=gather, scatter=scatter, weights=fused_weights, config=config)
        y_raw = None
        if weights is not None and fused_weights is None:
            # The routing weights need a gradient, which needs the unweighted output: keep it and
            # apply the weights outside the kernel.
            y_raw = y
            w_rows = weights if scatter else weights[routing.sorted_slots.long()]
            y = (y_raw.float() * w_rows.float()[:, None]).to(y_raw.dtype)
        ctx.save_for_backward(x, w, weights, y_raw)
        ctx.routing, ctx.gather, ctx.scatter, ctx.configs = routing, gather, scatter, configs
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, weights, y_raw = ctx.saved_tensors
        routing, gather, scatter, configs = ctx.routing, ctx.gather, ctx.scatter, ctx.configs
        dy = dy.contiguous()
        dx = dw = d_weights = None
        if ctx.needs_input_grad[0]:
            dx = backward_dx(dy, w, routing, gather=gather, scatter=scatter, weights=weights,
                             config=configs.get("dx"))
        if ctx.needs_input_grad[1]:
            dw = backward_dw(dy, x, w.shape, routing, gather=gather, scatter=scatter, weights=weights,
                             dtype=w.dtype, config=configs.get("dw"))
        if weights is not None and ctx.needs_input_grad[2]:
            per_row = (dy.float() * y_raw.float()).sum(-1)
            d_weights = _rows_to_slots(per_row, routing, scatter).to(weights.dtype)
        return dx, dw, d_weights, None, None, None, None


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, routing: Routing, *, gather: bool = False,
                 scatter: bool = False, routing_weights: torch.Tensor | None = None,
                 configs: Mapping[str, KernelConfig] | None = None) -> torch.Tensor:
    """Differentiable grouped GEMM ``Y[rows of e] = X[rows of e]·W[e]ᵀ``.

    Args:
        x: ``[T, K]`` in token order when ``gather`` (row of slot s is ``s // k``), else ``[M, K]``
            in expert order.
        w: ``[E, N, K]`` expert weights.
        routing: from ``moe_tune.ops.routing.build_routing(top_k_index, E)``.
        gather: read X rows in token order.
        scatter: write Y rows in token-slot order (``[M, N]``, row ``t·k + j``) instead of expert
            order.
        routing_weights: optional ``[M]`` (flattened ``top_k_weights``) multiplying each output row.
        configs: optional ``{"forward"|"dx"|"dw": KernelConfig}``; a missing pass is resolved by
            the runtime loader (cache, else the heuristic default).
    """
    configs = dict(configs or {})
    unknown = set(configs) - {"forward", "dx", "dw"}
    if unknown:
        _fail(f"configs keys must be forward, dx or dw; got {', '.join(sorted(unknown))}")
    return _GroupedGemm.apply(x, w, routing_weights, routing, bool(gather), bool(scatter), configs)
