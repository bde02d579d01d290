"""Stage-by-stage check of the fused experts block's kernels on a GPU against plain torch in
float32, per config set, plus the host cost of each step of an eager call.

    PYTHONPATH=. python3 benchmarks/gpu_block_diag.py
"""

from __future__ import annotations

import time

import torch

from moe_tune.device import query_device
from moe_tune.ops import block, launch
from moe_tune.ops.routing import build_routing, random_routing
from moe_tune.problem import KernelConfig


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def check(T, H, I, E, k, dtype, cfgs, label):
    dev = "cuda"
    info = query_device(dev)
    M = T * k
    x = torch.randn(T, H, device=dev, dtype=dtype)
    w1 = (torch.randn(E, 2 * I, H, device=dev) * H**-0.5).to(dtype)
    w2 = (torch.randn(E, H, I, device=dev) * I**-0.5).to(dtype)
    g = torch.randn(T, H, device=dev, dtype=dtype)
    wts = torch.rand(M, device=dev, dtype=dtype)
    routing = build_routing(random_routing(T, E, k, device=dev), E)
    slots = routing.sorted_slots.long()
    offs = routing.expert_offsets.tolist()
    nan = lambda *s, dt=dtype: torch.full(s, float("nan"), device=dev, dtype=dt)
    # references in float32, expert order
    xs = x[slots // k].float()
    h_ref = torch.empty(M, 2 * I, device=dev)
    for e in range(E):
        h_ref[offs[e]:offs[e + 1]] = xs[offs[e]:offs[e + 1]] @ w1[e].float().T
    gate, up = h_ref[:, :I], h_ref[:, I:]
    act_ref = torch.nn.functional.silu(gate) * up
    h, act, x_s = nan(M, 2 * I), nan(M, I), nan(M, H)
    launch.grouped_mm(x, w1, act, routing, None, trans_w=False, gather_a=True, gather_div=k, scatter_c=False,
                      cfg=cfgs["up", "forward"], info=info, epilogue="glu", h=h, sorted_a=x_s)
    torch.cuda.synchronize()
    out = {"h_gate": rel(h[:, :I], gate), "h_up": rel(h[:, I:], up), "act": rel(act, act_ref), "x_s": rel(x_s, xs)}
    # down dx glu_bwd on the kernel's own h
    hf = h.float()
    gate, up = hf[:, :I], hf[:, I:]
    gs = g[slots // k].float()
    da_raw = torch.empty(M, I, device=dev)
    for e in range(E):
        da_raw[offs[e]:offs[e + 1]] = gs[offs[e]:offs[e + 1]] @ w2[e].float()
    sig = torch.sigmoid(gate)
    a = gate * sig * up
    wr = wts.float()[slots][:, None]
    dsp_ref = (da_raw * a).sum(1)
    da = da_raw * wr
    dgate = da * up * sig * (1 + gate * (1 - sig))
    dup = da * gate * sig
    c = cfgs["down", "dx"]
    d_h, aux, g_s = nan(M, 2 * I), nan(M, I), nan(M, H)
    dsp = nan(block.dsp_blocks(I, c), M, dt=torch.float32)
    launch.grouped_mm(g, w2, d_h, routing, wts, trans_w=True, gather_a=True, gather_div=k, scatter_c=False, cfg=c,
                      info=info, epilogue="glu_bwd", h=h, aux=aux, dsp=dsp, sorted_a=g_s)
    torch.cuda.synchronize()
    out.update({"dgate": rel(d_h[:, :I], dgate), "dup": rel(d_h[:, I:], dup), "aux": rel(aux, a * wr),
                "dsp": rel(dsp.sum(0)[slots], dsp_ref), "g_s": rel(g_s, gs)})
    print(f"{label:<28} " + "  ".join(f"{k_}={v:.1e}" for k_, v in out.items()), flush=True)


def host_costs(T=128, H=2048, I=768, E=128, k=8, dtype=torch.bfloat16, n=200):
    dev = "cuda"
    info = query_device(dev)
    x = torch.randn(T, H, device=dev, dtype=dtype)
    w1 = torch.randn(E, 2 * I, H, device=dev, dtype=dtype)
    idx = random_routing(T, E, k, device=dev)
    wts = torch.rand(T, k, device=dev, dtype=dtype)
    routing = build_routing(idx, E)
    cfg = block.block_configs(E, H, I, k, dtype, T, info)
    act, h = torch.empty(T * k, I, device=dev, dtype=dtype), torch.empty(T * k, 2 * I, device=dev, dtype=dtype)

    def timeit(name, fn):
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        dt = (time.perf_counter() - t0) / n * 1e6
        torch.cuda.synchronize()
        print(f"host {name:<34} {dt:8.1f} us", flush=True)

    timeit("query_device", lambda: query_device(x.device))
    timeit("block_configs", lambda: block.block_configs(E, H, I, k, dtype, T, info))
    timeit("build_routing", lambda: build_routing(idx, E))
    timeit("torch.empty x2", lambda: (torch.empty(T * k, I, device=dev, dtype=dtype), torch.empty(T, 1, device=dev)))
    timeit("launch glu fwd (direct)", lambda: launch.grouped_mm(
        x, w1, act, routing, None, trans_w=False, gather_a=True, gather_div=k, scatter_c=False,
        cfg=cfg["up", "forward"], info=info, epilogue="glu", h=h))
    timeit("launch glu fwd (wrap_triton)", lambda: launch.grouped_mm(
        x, w1, act, routing, None, trans_w=False, gather_a=True, gather_div=k, scatter_c=False,
        cfg=cfg["up", "forward"], info=info, epilogue="glu", h=h, traced=True))
    w2 = torch.randn(E, H, I, device=dev, dtype=dtype)
    timeit("block.forward", lambda: block.forward(x, w1, w2, idx, wts, sort_x=True, traced=False))
    from moe_tune.ops.moe_experts import moe_experts

    xg = x.clone().requires_grad_()
    w1g, w2g, wg = w1.clone().requires_grad_(), w2.clone().requires_grad_(), wts.clone().requires_grad_()
    timeit("moe_experts fwd", lambda: moe_experts(xg, w1g, w2g, idx, wg))
    grad = torch.randn(T, H, device=dev, dtype=dtype)
    timeit("moe_experts fwd+bwd", lambda: moe_experts(xg, w1g, w2g, idx, wg).backward(grad))
    timeit("moe_experts fwd+bwd no_grad_w", lambda: moe_experts(xg, w1, w2, idx, wg).backward(grad))


def variants(T=16384, H=2048, I=768, E=128, k=8, dtype=torch.bfloat16):
    """What each fusion costs: the down dx and up forward with and without their epilogue and
    row copy, at the model's shapes."""
    from triton.testing import do_bench

    dev = "cuda"
    info = query_device(dev)
    M = T * k
    x = torch.randn(T, H, device=dev, dtype=dtype)
    w1 = (torch.randn(E, 2 * I, H, device=dev) * H**-0.5).to(dtype)
    w2 = (torch.randn(E, H, I, device=dev) * I**-0.5).to(dtype)
    wts = torch.rand(M, device=dev, dtype=dtype)
    routing = build_routing(random_routing(T, E, k, device=dev), E)
    h, d_h = torch.randn(M, 2 * I, device=dev, dtype=dtype), torch.empty(M, 2 * I, device=dev, dtype=dtype)
    act, rows_h = torch.empty(M, I, device=dev, dtype=dtype), torch.empty(M, H, device=dev, dtype=dtype)
    dsp = torch.empty(64, M, device=dev, dtype=torch.float32)

    def c(bm, bn, bk, w, s_):
        return KernelConfig(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=s_, TMA_LOAD=True)

    cases = []
    for cfg in (c(64, 128, 64, 8, 4), c(128, 64, 64, 8, 4), c(64, 64, 64, 4, 4), c(128, 128, 64, 8, 3)):
        for sort in (True, False):
            cases.append((f"down dx glu_bwd sort={sort:d} {cfg.short()}", 2 * M * H * I, lambda cfg=cfg, sort=sort:
                          launch.grouped_mm(x, w2, d_h, routing, wts, trans_w=True, gather_a=True, gather_div=k,
                                            scatter_c=False, cfg=cfg, info=info, epilogue="glu_bwd", h=h, aux=act,
                                            dsp=dsp, sorted_a=rows_h if sort else None)))
    for cfg in (c(128, 256, 64, 8, 3), c(128, 128, 64, 8, 4)):
        for sort in (True, False):
            cases.append((f"down dx plain  sort={sort:d} {cfg.short()}", 2 * M * H * I, lambda cfg=cfg, sort=sort:
                          launch.grouped_mm(x, w2, act, routing, None, trans_w=True, gather_a=True, gather_div=k,
                                            scatter_c=False, cfg=cfg, info=info, sorted_a=rows_h if sort else None)))
    for cfg in (c(128, 128, 64, 8, 3), c(128, 64, 64, 8, 4), c(64, 128, 64, 8, 4)):
        for sort in (True, False):
            cases.append((f"up fwd glu     sort={sort:d} {cfg.short()}", 2 * M * H * 2 * I, lambda cfg=cfg, sort=sort:
                          launch.grouped_mm(x, w1, act, routing, None, trans_w=False, gather_a=True, gather_div=k,
                                            scatter_c=False, cfg=cfg, info=info, epilogue="glu", h=h,
                                            sorted_a=rows_h if sort else None)))
    for cfg in (c(128, 256, 64, 8, 3),):
        for sort in (True, False):
            cases.append((f"up fwd plain   sort={sort:d} {cfg.short()}", 2 * M * H * 2 * I, lambda cfg=cfg, sort=sort:
                          launch.grouped_mm(x, w1, h, routing, None, trans_w=False, gather_a=True, gather_div=k,
                                            scatter_c=False, cfg=cfg, info=info, sorted_a=rows_h if sort else None)))
    cases.append(("copy rows (index_select)", 0, lambda: x.index_select(0, routing.sorted_slots.long() // k)))
    cases.append(("sum k slots", 0, lambda: rows_h.view(T, k, H).sum(1)))
    for name, flops, fn in cases:
        try:
            fn()
            torch.cuda.synchronize()
            ms = do_bench(fn, warmup=10, rep=50, return_mode="median")
            print(f"variant {name:<58} {ms:7.3f} ms  {flops / ms / 1e9 if flops else 0:6.0f} TF/s", flush=True)
        except Exception as exc:
            print(f"variant {name:<58} failed: {type(exc).__name__}: {str(exc)[:120]}", flush=True)


def host_profile(T=128, H=2048, I=768, E=128, k=8, dtype=torch.bfloat16):
    """Host time per call with the launch queue never full, and where the forward's goes."""
    import cProfile
    import pstats

    from moe_tune.ops.moe_experts import moe_experts

    dev = "cuda"
    x = torch.randn(T, H, device=dev, dtype=dtype, requires_grad=True)
    w1 = torch.randn(E, 2 * I, H, device=dev, dtype=dtype, requires_grad=True)
    w2 = torch.randn(E, H, I, device=dev, dtype=dtype, requires_grad=True)
    idx = random_routing(T, E, k, device=dev)
    wts = torch.rand(T, k, device=dev, dtype=dtype, requires_grad=True)
    grad = torch.randn(T, H, device=dev, dtype=dtype)
    for frozen in (False, True):
        w1.requires_grad_(not frozen)
        w2.requires_grad_(not frozen)
        for _ in range(10):
            moe_experts(x, w1, w2, idx, wts).backward(grad)
        torch.cuda.synchronize()
        n = 20  # 20 x ~20 launches stays inside the launch queue: the host never waits on the GPU
        t0 = time.perf_counter()
        for _ in range(n):
            for t in (x, w1, w2, wts):
                t.grad = None
            moe_experts(x, w1, w2, idx, wts).backward(grad)
        host = (time.perf_counter() - t0) / n * 1e3
        torch.cuda.synchronize()
        print(f"host fwd+bwd frozen={frozen}: {host:.3f} ms per call (back to back, queue not full)", flush=True)
    prof = cProfile.Profile()
    torch.cuda.synchronize()
    prof.enable()
    for _ in range(20):
        moe_experts(x, w1, w2, idx, wts)
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)


def main():
    import sys

    print(torch.cuda.get_device_name(), flush=True)
    if "--variants" in sys.argv:
        host_profile()
        variants()
        return
    info = query_device("cuda")
    plain = KernelConfig(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)
    tma = KernelConfig(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3, TMA_LOAD=True)
    for T, H, I, E, k in ((1, 256, 128, 8, 2), (512, 256, 128, 8, 2), (2048, 2048, 768, 128, 8)):
        defaults = block.block_configs(E, H, I, k, torch.bfloat16, T, info)
        for label, cfgs in (("default", defaults),
                            ("plain64", {key: plain for key in defaults}),
                            ("tma64", {key: tma for key in defaults})):
            for dtype in (torch.bfloat16, torch.float16):
                check(T, H, I, E, k, dtype, cfgs, f"T{T} H{H} {label} {str(dtype)[6:]}")
    host_costs()


if __name__ == "__main__":
    main()
