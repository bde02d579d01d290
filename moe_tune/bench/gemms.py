"""The six grouped GEMMs of one MoE layer, each run four ways (five with torch.compile) and timed.

Data flow, per token count T (M = T·k routed rows):

1. ``build_cases(shape, T, dtype, device, seed)`` — random router logits → top-k → ``Routing``
   (built once, outside every timer), random activations and weights, and for each of the six
   problems a ``GemmCase``: moe-tune's launcher for any config, the ``torch._grouped_mm`` path a
   user writes for the same layout, and the shape of a dense matmul of the same FLOPs;
2. ``bench_case`` — the tuned config (``moe_tune.runtime.explain``: cache, else the heuristic
   default, and where it came from) and the heuristic default (``moe_tune.space.default_config``);
   with ``compile_backend``, also the ``torch._grouped_mm`` path under
   ``torch.compile(fullgraph=True)`` (Inductor fuses the permutes around the grouped GEMM: the
   baseline a user who compiles has; if it fails to compile, the row says why); each moe-tune
   run's output (and the compiled baseline's) is compared with eager ``torch._grouped_mm``'s once
   (a sanity check, not an accuracy test), then the variants are timed → ``GemmRow``.

The ``torch._grouped_mm`` path, by problem (what a user writes without fused permutes):

=========  =================================================================================
up fwd     gather X rows (``x[slot // k]``), grouped GEMM into expert order
up dx      grouped GEMM, scatter rows back to slot order, sum each token's k slots
up dw      gather X rows, grouped GEMM over the rows (``offs`` on the reduction)
down fwd   grouped GEMM, multiply each row by its routing weight, scatter to slot order
down dx    gather dY rows into expert order, grouped GEMM (unweighted, as the experts block runs it:
           its output gives the routing-weight gradient, and the weight joins dA after it)
down dw    the same weighted gather, grouped GEMM over the rows
=========  =================================================================================

moe-tune's dw cases run the dW as the experts block does (``fusion="sorted"``): the gathered
operand copied to expert order inside the timed call, the routing weight already in A (the
block's SwiGLU backward writes w·A, so that multiply is outside the timer here too).

gpt-oss's layout (weights stored [E, K, N]) runs its six as its block does
(``moe_tune.ops.problems``), against ``torch._grouped_mm`` on the same weights.

Works on any ``MoeShape`` and device: ``device="cpu"`` runs moe-tune's kernels in Triton's
interpreter (``TRITON_INTERPRET=1``, float32) so the tests exercise this module on tiny shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from moe_tune.progress import NullProgress, Progress
from moe_tune.bench.results import GROUPED_MM_COMPILED, ConfigSource, GemmRow
from moe_tune.bench.timing import Timer
from moe_tune.device import DeviceInfo, query_device
from moe_tune.ops import grouped_gemm as gg
from moe_tune.ops import launch
from moe_tune.ops.routing import build_routing, random_routing
from moe_tune.problem import KernelConfig, MoeShape, Problem
from moe_tune.space import default_config

# Relative difference from torch._grouped_mm above which a run counts as computing something else:
# both sides round to the dtype (the grouped_mm path also rounds the weighted rows and the k-slot
# sums once more), so a correct kernel sits near 2^-8 in bfloat16; a wrong one near 1.
CHECK_TOLERANCE = {"bfloat16": 2e-2, "float16": 1e-2, "float32": 1e-2}



UNSAFE_COMPILED_DW = ("skipped: torch.compile of torch._grouped_mm's weight-gradient form corrupted GPU memory "
                      "(device-side assert in the next op; torch 2.11, H200)")


def steps_per_case(compiled: bool) -> int:
    """Progress steps per case: grouped_mm, default, tuned (even when it reuses the default's
    time), dense, and the compiled grouped_mm."""
    return 5 if compiled else 4


@dataclass(frozen=True)
class GemmCase:
    """One problem at one token count, ready to run: ``moe_tune(config)`` returns a no-argument
    launch of moe-tune's kernel with that config; ``grouped_mm`` is the torch path;
    ``dense_mnk`` = (rows, reduction, columns) of a dense matmul of the same FLOPs, oriented like
    the pass."""

    problem: Problem
    tokens: int
    moe_tune: Callable[[KernelConfig], Callable[[], torch.Tensor]]
    grouped_mm: Callable[[], torch.Tensor]
    dense_mnk: tuple[int, int, int]


def torch_dtype(name: str) -> torch.dtype:
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def build_cases(shape: MoeShape, tokens: int, dtype: str = "bfloat16", device: str = "cuda",
                seed: int = 0) -> list[GemmCase]:
    """The six problems of ``shape`` at ``tokens`` tokens, in ``MoeShape.problems`` order."""
    E, H, I, k = shape.E, shape.H, shape.I, shape.topk
    T, M = tokens, tokens * shape.topk
    dt = torch_dtype(dtype)
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*size, scale=1.0):
        return torch.randn(*size, generator=gen, device=device, dtype=dt) * scale

    # -- routing and inputs: built once, outside every timer ------------------------------------
    routing = build_routing(random_routing(T, E, k, device=device, generator=gen), E)
    offs = routing.expert_offsets[1:].contiguous()  # what torch._grouped_mm calls offs
    slots = routing.sorted_slots.long()  # token-slot id of each expert-ordered row
    token_of_row = slots // k
    w_route = torch.rand(M, generator=gen, device=device)  # one routing weight per slot, float32
    w_route_rows = w_route[slots].to(dt)[:, None]  # in expert order, as the torch path applies it

    x = randn(T, H)  # up input, token order
    kn = shape.layout == "gpt_oss"  # weights stored [E, K, N]; w1 and w2 are then [E, N, K] views
    w1 = randn(E, H, 2 * I, scale=H**-0.5).transpose(1, 2) if kn else randn(E, 2 * I, H, scale=H**-0.5)
    w2 = randn(E, I, H, scale=I**-0.5).transpose(1, 2) if kn else randn(E, H, I, scale=I**-0.5)
    a = randn(M, I)  # down input, expert order
    dy_up = randn(M, 2 * I)  # gradient of the up output, expert order
    dy_down = randn(M, H)  # gradient of the down output, slot order

    up, down = shape.problems(dtype)[:3], shape.problems(dtype)[3:]
    p = {q.pass_: q for q in up}
    d = {q.pass_: q for q in down}

    # -- torch._grouped_mm with the permutes each layout needs ----------------------------------
    def up_fwd_ref():
        return torch._grouped_mm(x[token_of_row], w1.transpose(1, 2), offs=offs)

    def up_dx_ref():
        d_rows = torch._grouped_mm(dy_up, w1, offs=offs)
        out = torch.empty_like(d_rows)
        out[slots] = d_rows
        return out.view(T, k, H).sum(1)

    def up_dw_ref():
        return torch._grouped_mm(dy_up.t(), x[token_of_row], offs=offs)

    def down_fwd_ref():
        y_rows = torch._grouped_mm(a, w2.transpose(1, 2), offs=offs) * w_route_rows
        out = torch.empty_like(y_rows)
        out[slots] = y_rows
        return out

    def down_dx_ref():
        return torch._grouped_mm(dy_down[slots], w2, offs=offs)

    def down_dw_ref():
        return torch._grouped_mm((dy_down[slots] * w_route_rows).t(), a, offs=offs)

    # -- moe-tune: the same layouts, permutes and routing weight fused into the kernels ----------
    scattered = dict(scatter=True, weights=w_route)
    # The dW as the experts block runs it ("sorted"): the gathered operand copied to expert order
    # (timed), the routing weight already in A (the block's SwiGLU backward writes w·A: untimed).
    info = query_device(device)
    token_rows = routing.sorted_slots // k
    token_rows_slots = routing.sorted_slots
    weighted_a = (a.float() * w_route_rows.float()).to(dt)

    def sorted_dw(dy_s, x_s, w_shape, cfg):
        out = torch.empty(w_shape, dtype=dt, device=device)
        launch.grouped_mm_dw(dy_s, x_s, out, routing, None, gather_dy=False, dy_div=1, gather_x=False, x_div=1,
                             cfg=cfg, info=info)
        return out

    if kn:
        return _gpt_oss_cases(up + down, T, routing, info, x, w1.transpose(1, 2), w2.transpose(1, 2), a, dy_up,
                              dy_down, w_route, weighted_a,
                              [up_fwd_ref, up_dx_ref, up_dw_ref, down_fwd_ref, down_dx_ref, down_dw_ref])
    return [
        GemmCase(p["forward"], T, lambda c: lambda: gg.forward(x, w1, routing, gather=True, config=c),
                 up_fwd_ref, (M, H, 2 * I)),
        GemmCase(p["dx"], T, lambda c: lambda: gg.backward_dx(dy_up, w1, routing, gather=True, config=c),
                 up_dx_ref, (M, 2 * I, H)),
        GemmCase(p["dw"], T, lambda c: lambda: sorted_dw(dy_up, x.index_select(0, token_rows), w1.shape, c),
                 up_dw_ref, (2 * I, M, H)),
        GemmCase(d["forward"], T, lambda c: lambda: gg.forward(a, w2, routing, config=c, **scattered),
                 down_fwd_ref, (M, I, H)),
        GemmCase(d["dx"], T, lambda c: lambda: gg.backward_dx(dy_down, w2, routing, scatter=True, config=c),
                 down_dx_ref, (M, H, I)),
        GemmCase(d["dw"], T, lambda c: lambda: sorted_dw(dy_down.index_select(0, token_rows_slots), weighted_a, w2.shape,
                                                          c),
                 down_dw_ref, (H, M, I)),
    ]


def _gpt_oss_cases(problems, T, routing, info, x, w1, w2, a, dy_up, dy_down, w_route, weighted_a, refs):
    """gpt-oss's six as its block launches them (``moe_tune.ops.problems``: [E, K, N] weights
    ``w1``/``w2`` read as stored, dW on rows copied to expert order (the copy timed), written
    [E, K, N] and compared through a transposed view); the ``torch._grouped_mm`` paths are the
    Qwen layout's on the transposed views, which is what a user writes for these weights."""
    from moe_tune.ops import problems as runs

    M, H = routing.num_rows, x.shape[1]
    slots = routing.sorted_slots.long()
    operands = [
        dict(x=x, w=w1),  # up forward
        dict(dy=dy_up, w=w1),  # up dx
        lambda: dict(x=x.index_select(0, slots // routing.topk), dy=dy_up),  # up dW: the row copy is timed
        dict(x=a, w=w2, weights=w_route),  # down forward
        dict(dy=dy_down, w=w2),  # down dx, unweighted
        lambda: dict(x=weighted_a, dy=dy_down.index_select(0, slots)),  # down dW: the row copy is timed
    ]

    def run(problem, inputs):
        def with_config(cfg):
            def launch_once():
                given = inputs() if callable(inputs) else inputs
                out = torch.empty(runs.output_shape(problem, routing), dtype=x.dtype, device=x.device)
                result = runs.launch(problem, given, routing, cfg, out, info)
                return result.transpose(1, 2) if problem.pass_ == "dw" else result
            return launch_once
        return with_config

    mnk = [(M, H, w1.shape[2]), (M, w1.shape[2], H), (w1.shape[2], M, H), (M, a.shape[1], H), (M, H, a.shape[1]),
           (H, M, a.shape[1])]
    return [GemmCase(problem, T, run(problem, inputs), ref, dims)
            for problem, inputs, ref, dims in zip(problems, operands, refs, mnk)]


def dense_matmul(mnk: tuple[int, int, int], dtype: str, device: str, seed: int = 0) -> Callable[[], torch.Tensor]:
    """One cuBLAS matmul ``[m, k] @ [k, n]``: the practical ceiling for 2·m·n·k FLOPs."""
    m, k, n = mnk
    gen = torch.Generator(device=device).manual_seed(seed)
    lhs = torch.randn(m, k, generator=gen, device=device, dtype=torch_dtype(dtype))
    rhs = torch.randn(k, n, generator=gen, device=device, dtype=torch_dtype(dtype))
    return lambda: lhs @ rhs


def relative_difference(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float32 (NaN or inf in ``out`` gives inf)."""
    out32, ref32 = out.float(), ref.float()
    if not bool(torch.isfinite(out32).all()):
        return float("inf")
    denom = ref32.norm().item()
    diff = (out32 - ref32).norm().item()
    return diff / denom if denom > 0 else diff


def bench_case(case: GemmCase, info: DeviceInfo, timer: Timer, progress: Progress | None = None,
               seed: int = 0, compile_backend: str | None = None) -> GemmRow:
    """Check, then time the variants of one case (see the module docstring)."""
    from moe_tune import runtime
    from moe_tune.bench.isolation import describe_error

    progress = progress or NullProgress()
    problem, tokens = case.problem, case.tokens
    label = f"T={tokens} {problem.gemm} {problem.pass_}"
    device = "cpu" if info.is_interpreter else "cuda"
    default = default_config(problem, info)
    resolution = runtime.explain(problem, tokens, info)
    tuned = resolution.config

    # Sanity check, outside every timer: moe-tune's output against torch._grouped_mm's.
    reference = case.grouped_mm()
    errors = {"default": relative_difference(case.moe_tune(default)(), reference)}
    errors["tuned"] = errors["default"] if tuned == default else relative_difference(case.moe_tune(tuned)(), reference)
    failures, compiled = {}, None
    if compile_backend is not None and case.problem.pass_ == "dw" and torch.cuda.is_available():
        # Inductor's lowering of the 2-D x 2-D (weight-gradient) form of torch._grouped_mm wrote
        # out of bounds on an H200 (torch 2.11, 2026-11-27): the next eager index op hit a
        # device-side assert, and a process's CUDA context does not survive one. Skipped, said so.
        failures[GROUPED_MM_COMPILED] = UNSAFE_COMPILED_DW
    elif compile_backend is not None:
        compiled = torch.compile(case.grouped_mm, fullgraph=True, backend=compile_backend, dynamic=False)
        try:
            errors[GROUPED_MM_COMPILED] = relative_difference(compiled(), reference)  # compiles here, untimed
        except Exception as exc:  # the baseline failing to compile is a cell error, not the end of the run
            failures[GROUPED_MM_COMPILED], compiled = describe_error(exc), None
    del reference

    timings = {}
    progress.begin(f"{label}: torch._grouped_mm")
    timings["grouped_mm"] = timer(case.grouped_mm)
    progress.end()
    progress.begin(f"{label}: moe-tune default {default.short()} against tuned {tuned.short()}")
    if tuned == default:  # the same config is the same kernel: timing it twice would only measure noise
        timings["default"] = timings["tuned"] = timer(case.moe_tune(default))
    else:  # head to head in interleaved rounds, as the sweep compared them, so drift favours neither
        timings["default"], timings["tuned"] = timer.versus([case.moe_tune(default), case.moe_tune(tuned)])
    progress.end()
    progress.begin(f"{label}: moe-tune tuned {tuned.short()} (timed with the default)")
    progress.end()
    if compile_backend is not None:
        progress.begin(f"{label}: torch._grouped_mm + torch.compile")
        if compiled is not None:
            timings[GROUPED_MM_COMPILED] = timer(compiled)
        progress.end()
    progress.begin(f"{label}: dense matmul")
    timings["dense"] = timer(dense_matmul(case.dense_mnk, problem.dtype, device, seed))
    progress.end()

    source = ConfigSource(resolution.source, resolution.path, resolution.bucket, resolution.triton)
    return GemmRow(tokens=tokens, problem=problem, tuned_config=tuned, tuned_from=source, default_config=default,
                   timings=timings, errors=errors, tolerance=CHECK_TOLERANCE[problem.dtype], failures=failures)


def bench_gemms(shape: MoeShape, tokens: int, *, dtype: str, device: str, timer: Timer,
                progress: Progress | None = None, seed: int = 0, compile_backend: str | None = None) -> list[GemmRow]:
    """The six ``GemmRow`` of ``shape`` at ``tokens`` tokens; ``compile_backend``: also time the
    ``torch._grouped_mm`` paths under torch.compile with that backend."""
    from moe_tune.bench.isolation import reset_compiler

    info = query_device(device)
    cases = build_cases(shape, tokens, dtype, device, seed)
    if compile_backend is not None:
        reset_compiler()  # the same six functions at another token count: compile fresh, static shapes
    return [bench_case(case, info, timer, progress, seed, compile_backend) for case in cases]

