"""Any tuning ``Problem`` as something to run: its inputs, one launch with a given config, and its
float reference. The sweep's cases (``moe_tune.tuning.cases``) go through here, so a problem is
gated and timed exactly as the experts block launches it — fused epilogue and all.

Data flow: ``make_inputs(problem, routing, randn, rand)`` → a dict of named tensors (activations,
weights, routing weights, and the side buffers a fused kernel writes besides its checked output)
→ ``launch(problem, inputs, routing, cfg, out, info)`` writes the checked output ``out``
(``output_shape``) → ``reference(problem, inputs, routing, dtype)`` computes it in ``dtype``.

The checked output is the launcher's (``moe_tune.ops.grouped_gemm``) for a plain problem, and
dW [E, N, K] from expert-ordered, unweighted operands for a "sorted" dw (what the block runs).

gpt-oss's problems (``weight_layout="kn"``: weights stored [E, K, N], ``moe_tune.ops.gptoss``)
launch as that block does: forward reads W as stored (``trans_w``), dx without the swap, and the
"sorted" dW writes [E, K, N] from (X rows, dY rows) in expert order. A "sort" launch (no block
runs one now) also writes the rows it gathers in expert order (a side buffer, ``inputs["sorted"]``). Their references are the
Qwen layout's on the transposed weights.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from moe_tune.device import DeviceInfo
from moe_tune.errors import InvalidInputError
from moe_tune.ops import grouped_gemm as gg
from moe_tune.ops import launch as launchers
from moe_tune.ops.routing import Routing
from moe_tune.ops.rows import slot_sum
from moe_tune.problem import KernelConfig, Problem

def supported(problem: Problem) -> bool:
    if problem.weight_layout == "kn":
        return problem.fusion in ("none", "sorted", "sort")
    return problem.fusion in ("none", "sorted")


def _require_supported(problem: Problem) -> None:
    if not supported(problem):
        raise InvalidInputError(f"no launcher runs {problem.key} as a standalone case")


def output_shape(problem: Problem, routing: Routing) -> tuple[int, ...]:
    p, rows = problem, routing.num_rows
    dw = (p.E, p.K, p.N) if p.weight_layout == "kn" else (p.E, p.N, p.K)
    return {"forward": (rows, p.N), "dx": (rows, p.K), "dw": dw}[p.pass_]


def make_inputs(problem: Problem, routing: Routing, randn: Callable[..., torch.Tensor],
                rand: Callable[..., torch.Tensor], *, compile_only: bool = False) -> dict[str, torch.Tensor]:
    """The tensors one launch reads and writes besides its checked output. ``randn``/``rand``
    draw seeded values of the problem's dtype. ``compile_only``: the weights are one expert's
    uninitialised memory seen E times (``expanded``), for launches under ``launch.compile_only``,
    which compile and run nothing."""
    _require_supported(problem)
    p = problem
    rows, tokens = routing.num_rows, routing.num_tokens
    like = randn(1)
    inputs: dict[str, torch.Tensor] = {}
    if p.weighted and p.fusion != "sorted":
        inputs["weights"] = rand(rows)
    if p.pass_ in ("forward", "dx"):
        w_shape = (p.E, p.K, p.N) if p.weight_layout == "kn" else (p.E, p.N, p.K)
        inputs["w"] = expanded(w_shape, like) if compile_only else randn(*w_shape)
    if p.fusion == "sort":  # the gathered rows, in expert order
        inputs["sorted"] = torch.empty(rows, p.K if p.pass_ == "forward" else p.N, dtype=like.dtype,
                                       device=like.device)
    if p.fusion == "sorted":
        inputs["dy"], inputs["x"] = randn(rows, p.N), randn(rows, p.K)
    else:
        if p.pass_ in ("forward", "dw"):
            inputs["x"] = randn(tokens if p.gather else rows, p.K)
        if p.pass_ in ("dx", "dw"):
            inputs["dy"] = randn(rows, p.N)
    return inputs


def expanded(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """``shape`` [E, ...] as E views of one uninitialised [1, ...]: a compile-only stand-in for a
    stack of expert weights (or a dW output) that costs one expert's memory. Triton specialises a
    kernel on each stride's divisibility by 16 and on its being 1, not on its value, so the expert
    stride 0 compiles the kernel the full stack does whenever the true stride (a multiple of N·K)
    is a multiple of 16 (otherwise the stack is allocated whole); gpt-oss-120b's [128, 2880, 5760]
    stacks took 4.6 GiB per compile worker."""
    per_expert = math.prod(shape[1:])
    if per_expert % 16 or per_expert == 1:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    return torch.empty((1, *shape[1:]), dtype=like.dtype, device=like.device).expand(shape)


def launch(problem: Problem, inputs: dict[str, torch.Tensor], routing: Routing, cfg: KernelConfig,
           out: torch.Tensor, info: DeviceInfo) -> torch.Tensor:
    """One launch of ``problem`` with ``cfg`` into ``out`` (``output_shape``); returns the checked
    output: ``out`` itself, except for a gathered dx, whose k slots per token are then summed."""
    _require_supported(problem)
    p = problem
    if p.weight_layout == "kn":
        return _launch_kn(p, inputs, routing, cfg, out, info)
    if p.fusion == "sorted":
        launchers.grouped_mm_dw(inputs["dy"], inputs["x"], out, routing, None, gather_dy=False, dy_div=1,
                                gather_x=False, x_div=1, cfg=cfg, info=info)
        return out
    flags = dict(gather=p.gather, scatter=p.scatter, weights=inputs.get("weights"), config=cfg, out=out)
    if p.pass_ == "forward":
        return gg.forward(inputs["x"], inputs["w"], routing, **flags)
    if p.pass_ == "dx":
        return gg.backward_dx(inputs["dy"], inputs["w"], routing, **flags)
    return gg.backward_dw(inputs["dy"], inputs["x"], (p.E, p.N, p.K), routing, **flags)


def _launch_kn(p: Problem, inputs: dict[str, torch.Tensor], routing: Routing, cfg: KernelConfig,
               out: torch.Tensor, info: DeviceInfo) -> torch.Tensor:
    sorted_a = inputs.get("sorted")
    if p.pass_ == "dw":  # "sorted": dW [E, K, N] = X_eᵀ·dY_e, both in expert order
        launchers.grouped_mm_dw(inputs["x"], inputs["dy"], out, routing, None, gather_dy=False, dy_div=1,
                                gather_x=False, x_div=1, cfg=cfg, info=info)
        return out
    weights = inputs.get("weights")
    if routing.num_rows == 0:
        return out
    if p.pass_ == "forward":
        launchers.grouped_mm(inputs["x"], inputs["w"], out, routing, weights, trans_w=True, gather_a=p.gather,
                             gather_div=routing.topk, scatter_c=p.scatter, cfg=cfg, info=info, sorted_a=sorted_a)
        return out
    launchers.grouped_mm(inputs["dy"], inputs["w"], out, routing, weights, trans_w=False, gather_a=p.scatter,
                         gather_div=1, scatter_c=p.gather, cfg=cfg, info=info, sorted_a=sorted_a)
    return slot_sum(out, routing.topk) if p.gather else out


def reference(problem: Problem, inputs: dict[str, torch.Tensor], routing: Routing,
              dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The checked output computed with plain torch in ``dtype`` (float64 by default)."""
    from moe_tune.reference import reference_dw, reference_dx, reference_forward

    _require_supported(problem)
    p = problem
    weights = inputs.get("weights")
    if p.fusion == "sorted":
        dw = reference_dw(inputs["dy"], inputs["x"], routing, dtype=dtype)
        return dw.transpose(1, 2) if p.weight_layout == "kn" else dw
    flags = dict(gather=p.gather, scatter=p.scatter, weights=weights, dtype=dtype)
    w = inputs.get("w")
    if w is not None and p.weight_layout == "kn":
        w = w.transpose(1, 2)  # [E, N, K]: the Qwen layout's references apply
    if p.pass_ == "forward":
        return reference_forward(inputs["x"], w, routing, **flags)
    if p.pass_ == "dx":
        return reference_dx(inputs["dy"], w, routing, **flags)
    return reference_dw(inputs["dy"], inputs["x"], routing, **flags)
