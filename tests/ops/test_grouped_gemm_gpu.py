"""Grouped-GEMM kernels on a CUDA GPU in bf16/fp16, against a float64 reference.

Shapes: Qwen3-30B-A3B's two expert GEMMs, a large-E shape (Qwen3-Next: E=512, k=10), and
DeepSeek-V3's gate_up weight, whose E·N·K = 7.5e9 elements needs 64-bit offsets.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moe_tune.device import query_device
from moe_tune.ops import grouped_gemm as gg
from moe_tune.ops.routing import build_routing, random_routing
from moe_tune.problem import KernelConfig, Problem
from moe_tune.reference import reference_dw, reference_dx, reference_forward, relative_error
from moe_tune.space import default_config

pytestmark = pytest.mark.gpu

# dtype, relative-error bound against float64 (bf16 operands land between 1e-3 and 1e-2)
TOLERANCES = {torch.bfloat16: 1e-2, torch.float16: 2e-3}

# (name, E, H, I, k, T)
SHAPES = [
    ("qwen3-30b-a3b", 128, 2048, 768, 8, 4096),  # the main target
    ("qwen3-next-80b-a3b", 512, 2048, 512, 10, 2048),  # large E: many small or empty experts
]

TMA_OFF = None  # the heuristic default: TMA off
TMA_ON = KernelConfig(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, TMA_LOAD=True)
DW_TMA_ON = KernelConfig(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3,
                         TMA_LOAD=True, TMA_STORE=True)


def _nan(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device="cuda")


@pytest.mark.parametrize("tma", [False, True], ids=["tma-off", "tma-on"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("gemm", ["up", "down"])
@pytest.mark.parametrize("name, E, H, I, topk, T", SHAPES, ids=[s[0] for s in SHAPES])
def test_three_passes_at_model_shapes(name, E, H, I, topk, T, gemm, dtype, tma):
    torch.manual_seed(hash((name, gemm, str(dtype), tma)) % 2**31)
    routing = build_routing(random_routing(T, E, topk, device="cuda"), E)
    M = T * topk
    if gemm == "up":
        N, K, gather, scatter, weights = 2 * I, H, True, False, None
    else:
        N, K, gather, scatter = H, I, False, True
        weights = torch.rand(M, device="cuda")
    x = torch.randn(T if gather else M, K, device="cuda", dtype=dtype)
    w = (torch.randn(E, N, K, device="cuda") / K**0.5).to(dtype)
    dy = torch.randn(M, N, device="cuda", dtype=dtype)
    kw = dict(gather=gather, scatter=scatter, weights=weights)
    tol = TOLERANCES[dtype]
    fwd_cfg = dx_cfg = TMA_ON if tma else None
    dw_cfg = DW_TMA_ON if tma else None
    if tma and gemm == "up":
        fwd_cfg = dataclasses.replace(TMA_ON, TMA_STORE=True)  # expert-order output: TMA store allowed

    y = gg.forward(x, w, routing, config=fwd_cfg, out=_nan((M, N), dtype), **kw)
    assert relative_error(y, reference_forward(x, w, routing, **kw)) < tol
    dx = gg.backward_dx(dy, w, routing, config=dx_cfg, out=_nan((M, K), dtype), **kw)
    assert relative_error(dx, reference_dx(dy, w, routing, **kw)) < tol
    dw = gg.backward_dw(dy, x, w.shape, routing, config=dw_cfg, out=_nan(w.shape, dtype), **kw)
    assert relative_error(dw, reference_dw(dy, x, routing, **kw)) < tol


def test_64bit_offsets_deepseek_v3_gate_up():
    # W is [256, 4096, 7168] bf16 (15 GB): rows of the last experts start past 2^31 elements.
    E, N, K, topk, T = 256, 4096, 7168, 8, 64
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip("needs ~24 GB of free GPU memory")
    torch.manual_seed(0)
    w = torch.empty(E, N, K, device="cuda", dtype=torch.bfloat16)
    w.normal_(0, K**-0.5)
    used = list(range(E - 8, E))
    idx = torch.stack([torch.randperm(8, device="cuda")[:topk] + (E - 8) for _ in range(T)])
    routing = build_routing(idx, E)
    x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(T * topk, N, device="cuda", dtype=torch.bfloat16)
    y = gg.forward(x, w, routing, gather=True, out=_nan((T * topk, N), torch.bfloat16))
    dx = gg.backward_dx(dy, w, routing, gather=True)
    dw = gg.backward_dw(dy, x, w.shape, routing, gather=True, out=_nan(w.shape, torch.bfloat16))

    # float64 reference over the eight used experts only (all 256 in float64 would be 60 GB)
    offs = routing.expert_offsets.tolist()
    slots = routing.sorted_slots.long()
    y_ref = torch.zeros(T * topk, N, device="cuda", dtype=torch.float64)
    dx_rows = torch.zeros(T * topk, K, device="cuda", dtype=torch.float64)
    for e in used:
        rows = slice(offs[e], offs[e + 1])
        w64 = w[e].double()
        y_ref[rows] = x[slots[rows] // topk].double() @ w64.T
        dx_rows[slots[rows]] = dy[rows].double() @ w64
        assert relative_error(dw[e], dy[rows].double().T @ x[slots[rows] // topk].double()) < 1e-2
    assert relative_error(y, y_ref) < 1e-2
    assert relative_error(dx, dx_rows.view(T, topk, K).sum(1)) < 1e-2
    assert not dw[: E - 8].any()  # empty experts: zeros written


def test_default_config_fits_this_device():
    info = query_device()
    for pass_ in ("forward", "dx", "dw"):
        problem = Problem(pass_, 128, 1536, 2048, 8, "bfloat16", gather=True)
        cfg = default_config(problem, info)
        assert cfg.num_stages >= 2


@pytest.mark.parametrize("tma", [False, True], ids=["tma-off", "tma-on"])
@pytest.mark.parametrize("precision, bound", [("highest", 2e-5), ("high", 5e-3)])
def test_float32_follows_torchs_tf32_setting(precision, bound, tma):
    """float32 computes as float32 (three TF32 products per tl.dot) unless torch allows TF32:
    with "highest" the three passes land near torch's own float32 error, with "high" at TF32's."""
    torch.manual_seed(11)
    E, H, I, topk, T = 16, 512, 256, 4, 1024
    routing = build_routing(random_routing(T, E, topk, device="cuda"), E)
    M = T * topk
    x = torch.randn(T, H, device="cuda")
    w = torch.randn(E, 2 * I, H, device="cuda") / H**0.5
    dy = torch.randn(M, 2 * I, device="cuda")
    kw = dict(gather=True, scatter=False, weights=None)
    # The bf16 TMA configs' shared memory doubles in float32 (over the H100's 227 KB): half the K tile.
    mm_cfg = dataclasses.replace(TMA_ON, BLOCK_K=32) if tma else None
    dw_cfg = dataclasses.replace(DW_TMA_ON, BLOCK_K=64) if tma else None
    fwd_cfg = dataclasses.replace(mm_cfg, TMA_STORE=True) if tma else None
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        y = gg.forward(x, w, routing, config=fwd_cfg, out=_nan((M, 2 * I), torch.float32), **kw)
        dx = gg.backward_dx(dy, w, routing, config=mm_cfg, out=_nan((M, H), torch.float32), **kw)
        dw = gg.backward_dw(dy, x, w.shape, routing, config=dw_cfg, out=_nan(w.shape, torch.float32), **kw)
    finally:
        torch.set_float32_matmul_precision(before)
    errors = [relative_error(y, reference_forward(x, w, routing, **kw)),
              relative_error(dx, reference_dx(dy, w, routing, **kw)),
              relative_error(dw, reference_dw(dy, x, routing, **kw))]
    assert max(errors) < bound, errors
    if precision == "high":  # TF32 really ran: float32-level error would mean the setting was ignored
        assert max(errors) > 1e-5, errors


WARP_SPEC_CONFIGS = {  # (mm config, dW config): the probe's winners and a 32-row dW step
    "128x256": (KernelConfig(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3,
                             TMA_LOAD=True, TMA_STORE=True, WARP_SPEC=True),
                KernelConfig(BLOCK_M=64, BLOCK_N=128, BLOCK_K=256, GROUP_M=8, num_warps=4, num_stages=3,
                             TMA_LOAD=True, TMA_STORE=True, WARP_SPEC=True)),
    "128x128": (KernelConfig(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4,
                             TMA_LOAD=True, TMA_STORE=True, WARP_SPEC=True),
                KernelConfig(BLOCK_M=32, BLOCK_N=128, BLOCK_K=256, GROUP_M=8, num_warps=4, num_stages=4,
                             TMA_LOAD=True, TMA_STORE=True, WARP_SPEC=True)),
}


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability()[0] != 9,
                    reason="Triton's Hopper warp specialisation")
@pytest.mark.parametrize("configs", list(WARP_SPEC_CONFIGS), ids=list(WARP_SPEC_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name, E, H, I, topk, T", SHAPES, ids=[s[0] for s in SHAPES])
def test_warp_specialised_passes_at_model_shapes(name, E, H, I, topk, T, dtype, configs):
    # Forward and dx on expert-ordered rows (TMA store) and dW on expert-ordered operands, with
    # the routing's row-block table; a skewed router leaves experts empty and crowds others.
    mm_cfg, dw_cfg = WARP_SPEC_CONFIGS[configs]
    for skew in (0.0, 4.0):
        torch.manual_seed(hash((name, str(dtype), configs, skew)) % 2**31)
        routing = build_routing(random_routing(T, E, topk, device="cuda", skew=skew), E)
        M = T * topk
        for N, K in ((2 * I, H), (H, I)):
            x = torch.randn(M, K, device="cuda", dtype=dtype)
            w = (torch.randn(E, N, K, device="cuda") / K**0.5).to(dtype)
            dy = torch.randn(M, N, device="cuda", dtype=dtype)
            y = gg.forward(x, w, routing, config=mm_cfg, out=_nan((M, N), dtype))
            assert relative_error(y, reference_forward(x, w, routing)) < TOLERANCES[dtype]
            dx = gg.backward_dx(dy, w, routing, config=mm_cfg, out=_nan((M, K), dtype))
            assert relative_error(dx, reference_dx(dy, w, routing)) < TOLERANCES[dtype]
            dw = gg.backward_dw(dy, x, w.shape, routing, config=dw_cfg, out=_nan(w.shape, dtype))
            assert relative_error(dw, reference_dw(dy, x, routing)) < TOLERANCES[dtype]


@pytest.mark.parametrize("warp_spec", [False, True], ids=["plain", "ws"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name, E, H, I, topk, T", SHAPES, ids=[s[0] for s in SHAPES])
def test_gathered_a_copied_to_expert_order_at_model_shapes(name, E, H, I, topk, T, dtype, warp_spec):
    # GATHER_COPY on the blocks' gathered-A GEMMs: the up forward (token rows gathered) and the
    # down dx (dY's slot rows gathered), copied to expert order first, then TMA (and, on Hopper,
    # warp specialisation) on A; uniform and skewed routing (empty and crowded experts).
    if warp_spec and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("Triton's Hopper warp specialisation")
    cfg = KernelConfig(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=4 if warp_spec else 8,
                       num_stages=3, TMA_LOAD=True, TMA_STORE=True, GATHER_COPY=True, WARP_SPEC=warp_spec)
    for skew in (0.0, 4.0):
        torch.manual_seed(hash((name, str(dtype), "copy", warp_spec, skew)) % 2**31)
        routing = build_routing(random_routing(T, E, topk, device="cuda", skew=skew), E)
        M = T * topk
        x = torch.randn(T, H, device="cuda", dtype=dtype)
        w1 = (torch.randn(E, 2 * I, H, device="cuda") / H**0.5).to(dtype)
        y = gg.forward(x, w1, routing, gather=True, config=cfg, out=_nan((M, 2 * I), dtype))
        assert relative_error(y, reference_forward(x, w1, routing, gather=True)) < TOLERANCES[dtype]
        w2 = (torch.randn(E, H, I, device="cuda") / I**0.5).to(dtype)
        dy = torch.randn(M, H, device="cuda", dtype=dtype)
        dx = gg.backward_dx(dy, w2, routing, scatter=True, config=cfg, out=_nan((M, I), dtype))
        assert relative_error(dx, reference_dx(dy, w2, routing, scatter=True)) < TOLERANCES[dtype]


# Two programs per SM (the configs gpt-oss-120b's dW sweep picked at 4096 tokens, H200) and a
# forward/dx tiling small enough for two: each pass against float64 on uniform and skewed routing.
TWO_PER_SM = {
    "mm": KernelConfig(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3, TMA_LOAD=True,
                       PROGRAMS_PER_SM=2),
    "dw": KernelConfig(BLOCK_M=32, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4, TMA_STORE=True,
                       PROGRAMS_PER_SM=2),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name, E, H, I, topk, T", SHAPES, ids=[s[0] for s in SHAPES])
def test_two_programs_per_sm_at_model_shapes(name, E, H, I, topk, T, dtype):
    for skew in (0.0, 4.0):
        torch.manual_seed(hash((name, str(dtype), "two", skew)) % 2**31)
        routing = build_routing(random_routing(T, E, topk, device="cuda", skew=skew), E)
        M = T * topk
        for N, K, gather, scatter in ((2 * I, H, True, False), (H, I, False, True)):
            kw = dict(gather=gather, scatter=scatter, weights=torch.rand(M, device="cuda") if scatter else None)
            x = torch.randn(T if gather else M, K, device="cuda", dtype=dtype)
            w = (torch.randn(E, N, K, device="cuda") / K**0.5).to(dtype)
            dy = torch.randn(M, N, device="cuda", dtype=dtype)
            y = gg.forward(x, w, routing, config=TWO_PER_SM["mm"], out=_nan((M, N), dtype), **kw)
            assert relative_error(y, reference_forward(x, w, routing, **kw)) < TOLERANCES[dtype]
            dx = gg.backward_dx(dy, w, routing, config=TWO_PER_SM["mm"], out=_nan((M, K), dtype), **kw)
            assert relative_error(dx, reference_dx(dy, w, routing, **kw)) < TOLERANCES[dtype]
            dw = gg.backward_dw(dy, x, w.shape, routing, config=TWO_PER_SM["dw"], out=_nan(w.shape, dtype), **kw)
            assert relative_error(dw, reference_dw(dy, x, routing, **kw)) < TOLERANCES[dtype]


@pytest.mark.parametrize("tma", [False, True], ids=["tma-off", "tma-on"])
def test_bound_dw_launches_into_fresh_outputs(tma):
    # launch.bind_grouped_mm_dw, as a graphed backward launches its weight gradients: the first
    # call through launch_kernel, later ones straight to Triton's launcher (with the bound
    # launch's own descriptor scratch where TMA is on), through launch_kernel again while a launch
    # hook is set (which then sees the launch), and through Triton's launcher on another stream
    # (which allocates a scratch of its own). Every call writes its whole poisoned output from
    # the operands' values at call time.
    import triton

    from moe_tune.ops import launch

    E, H, I, topk, T = 32, 512, 256, 4, 512
    routing = build_routing(random_routing(T, E, topk, device="cuda", skew=2.0), E)
    M = T * topk
    dy = torch.empty(M, 2 * I, device="cuda", dtype=torch.bfloat16)
    x = torch.empty(M, H, device="cuda", dtype=torch.bfloat16)
    template = torch.empty(E, 2 * I, H, device="cuda", dtype=torch.bfloat16)
    info = query_device(torch.device("cuda"))
    cfg = DW_TMA_ON if tma else default_config(Problem("dw", E, 2 * I, H, topk, "bfloat16"), info)
    bound = launch.bind_grouped_mm_dw(dy, x, template, routing, cfg, info)
    seen = []
    side = torch.cuda.Stream()

    def hook(metadata):
        seen.append(metadata)

    for call in range(6):
        dy.copy_(torch.randn(M, 2 * I, device="cuda"))
        x.copy_(torch.randn(M, H, device="cuda"))
        dw = _nan(template.shape, torch.bfloat16)
        if call == 2:
            triton.knobs.runtime.launch_enter_hook.add(hook)
        try:
            if call == 4:  # another stream
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    bound(dw)
                torch.cuda.current_stream().wait_stream(side)
            else:
                bound(dw)
        finally:
            triton.knobs.runtime.launch_enter_hook.remove(hook)
        assert relative_error(dw, reference_dw(dy, x, routing)) < TOLERANCES[torch.bfloat16], call
        assert len(seen) == (call >= 2), call
        # its own scratch from the first direct launch on, where the kernel needs one
        needs_scratch = bound.entry[0].run.global_scratch_size > 0
        assert (bound.scratch is not None) == (needs_scratch and call >= 1), call
    assert not tma or bound.scratch is not None  # device-side descriptors need scratch memory

