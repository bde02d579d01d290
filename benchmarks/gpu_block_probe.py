"""GPU probe of the fused experts block: a config scan of its six kernels, block timings against
transformers' grouped_mm experts (eager and torch.compile), host time per call, a kernel-time
breakdown, and CUDA-graph capture. One script so one device call answers all of it.

    PYTHONPATH=. python3 benchmarks/gpu_block_probe.py --out $OUT [--tokens 4096 16384] [--scan]

Writes ``probe.json`` (every number) under ``--out`` and prints a short table last. The scan's
winners (``--scan``) can be fed back with ``--configs probe.json`` so the block timings use them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

from moe_tune.device import query_device
from moe_tune.ops import block, launch
from moe_tune.ops.routing import build_routing, random_routing
from moe_tune.problem import KernelConfig, MoeShape

SHAPES = {
    "qwen3-30b-a3b": MoeShape(128, 2048, 768, 8),
    "olmoe-1b-7b": MoeShape(64, 2048, 1024, 8),
    "qwen3-next-80b-a3b": MoeShape(512, 2048, 512, 10),
    "deepseek-v2-lite": MoeShape(64, 2048, 1408, 6),
    "glm-4.5-air": MoeShape(128, 4096, 1408, 8),
    "mixtral-8x7b": MoeShape(8, 4096, 14336, 2),
    "qwen3-235b-a22b": MoeShape(128, 4096, 1536, 8),
}


def cfg(bm, bn, bk, w, s, load=True, store=False, g=8):
    return KernelConfig(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=g, num_warps=w, num_stages=s,
                        TMA_LOAD=load, TMA_STORE=store)


PLAIN = [cfg(128, 256, 64, 8, 3), cfg(128, 128, 64, 8, 4), cfg(128, 128, 64, 4, 4), cfg(64, 256, 64, 8, 3),
         cfg(128, 256, 64, 8, 4)]
SORTED_DW = [cfg(64, 256, 128, 8, 3, store=True), cfg(64, 128, 256, 8, 3, store=True),
             cfg(64, 256, 64, 8, 4, store=True), cfg(32, 256, 128, 8, 4, store=True),
             cfg(128, 128, 128, 8, 3, store=True), cfg(64, 128, 128, 4, 4, store=True)]
SCAN = {("up", "forward"): PLAIN, ("down", "dx"): PLAIN, ("up", "dx"): PLAIN, ("down", "forward"): PLAIN,
        ("up", "dw"): SORTED_DW, ("down", "dw"): SORTED_DW}


def bench_ms(fn, rep=60):
    fn()
    torch.cuda.synchronize()
    return do_bench(fn, warmup=10, rep=rep, return_mode="median")


# -------------------------------------------------------------------------------------------------
# Kernel scan
# -------------------------------------------------------------------------------------------------


def kernel_cases(shape: MoeShape, T: int, dtype=torch.bfloat16):
    """{(gemm, pass): fn(cfg)} launching that kernel of the block on realistic data."""
    E, H, I, k = shape.E, shape.H, shape.I, shape.topk
    M = T * k
    dev = "cuda"
    info = query_device(dev)
    x = torch.randn(T, H, device=dev, dtype=dtype)
    w1 = torch.randn(E, 2 * I, H, device=dev, dtype=dtype) * H**-0.5
    w2 = torch.randn(E, H, I, device=dev, dtype=dtype) * I**-0.5
    routing = build_routing(random_routing(T, E, k, device=dev), E)
    wts = torch.rand(M, device=dev, dtype=dtype)
    h = torch.randn(M, 2 * I, device=dev, dtype=dtype)
    act = torch.randn(M, I, device=dev, dtype=dtype)
    g = torch.randn(T, H, device=dev, dtype=dtype)
    x_s = torch.randn(M, H, device=dev, dtype=dtype)
    d_h = torch.randn(M, 2 * I, device=dev, dtype=dtype)
    rows_h = torch.empty(M, H, device=dev, dtype=dtype)
    d_w1 = torch.empty_like(w1)
    d_w2 = torch.empty_like(w2)

    def up_fwd(c):
        launch.grouped_mm(x, w1, h, routing, None, trans_w=False, gather_a=True, gather_div=k, scatter_c=False,
                          cfg=c, info=info)

    def down_fwd(c):
        launch.grouped_mm(act, w2, rows_h, routing, wts, trans_w=False, gather_a=False, gather_div=1, scatter_c=True,
                          cfg=c, info=info)

    def down_dx(c):
        launch.grouped_mm(g, w2, act, routing, None, trans_w=True, gather_a=True, gather_div=k, scatter_c=False,
                          cfg=c, info=info)

    def up_dx(c):
        launch.grouped_mm(d_h, w1, rows_h, routing, None, trans_w=True, gather_a=False, gather_div=1, scatter_c=True,
                          cfg=c, info=info)

    def up_dw(c):
        launch.grouped_mm_dw(d_h, x_s, d_w1, routing, None, gather_dy=False, dy_div=1, gather_x=False, x_div=1,
                             cfg=c, info=info)

    def down_dw(c):
        launch.grouped_mm_dw(rows_h, act, d_w2, routing, None, gather_dy=False, dy_div=1, gather_x=False, x_div=1,
                             cfg=c, info=info)

    flops = {("up", "forward"): 2 * M * 2 * I * H, ("down", "forward"): 2 * M * H * I, ("down", "dx"): 2 * M * H * I,
             ("up", "dx"): 2 * M * 2 * I * H, ("up", "dw"): 2 * M * 2 * I * H, ("down", "dw"): 2 * M * H * I}
    fns = {("up", "forward"): up_fwd, ("down", "forward"): down_fwd, ("down", "dx"): down_dx, ("up", "dx"): up_dx,
           ("up", "dw"): up_dw, ("down", "dw"): down_dw}
    return fns, flops


def scan(shape: MoeShape, T: int, results: dict) -> dict:
    fns, flops = kernel_cases(shape, T)
    info = query_device("cuda")
    defaults = block.block_configs(shape.E, shape.H, shape.I, shape.topk, torch.bfloat16, T, info)
    best = {}
    for key, fn in fns.items():
        rows = []
        for c in [defaults[key]] + [c for c in SCAN[key] if c != defaults[key]]:
            try:
                ms = bench_ms(lambda: fn(c), rep=40)
                rows.append({"config": c.to_dict(), "short": c.short(), "ms": ms, "tflops": flops[key] / ms / 1e9})
            except Exception as exc:  # a config the compiler rejects: recorded, not fatal
                rows.append({"config": c.to_dict(), "short": c.short(), "error": f"{type(exc).__name__}: {exc}"[:300]})
        ok = [r for r in rows if "ms" in r]
        win = min(ok, key=lambda r: r["ms"])
        best[key] = KernelConfig.from_dict(win["config"])
        results.setdefault("scan", {})[f"T{T}/{key[0]}/{key[1]}"] = {"default": rows[0], "rows": rows, "best": win}
        print(f"scan T={T} {key[0]:>4} {key[1]:<7} default {rows[0].get('tflops', 0):6.0f} TF/s  "
              f"best {win['tflops']:6.0f} TF/s {win['short']}", flush=True)
    return best


# -------------------------------------------------------------------------------------------------
# Block timings
# -------------------------------------------------------------------------------------------------


def build_experts(shape: MoeShape, seed=0):
    from moe_tune.bench.block import build_block

    return build_block(shape, "bfloat16", "cuda", seed)


def peak_mib(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def time_block(shape: MoeShape, T: int, results: dict, name: str, impls=("grouped_mm", "grouped_mm+compile",
                                                                         "moe_tune", "moe_tune+compile")):
    blk = build_experts(shape)
    experts = blk.experts
    gen = torch.Generator(device="cuda").manual_seed(T)
    x = torch.randn(T, shape.H, generator=gen, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        _, top_k_weights, top_k_index = blk.gate(x)
    x.requires_grad_()
    top_k_weights = top_k_weights.detach().requires_grad_()
    grad = torch.randn(T, shape.H, generator=gen, device="cuda", dtype=torch.bfloat16)
    leaves = [x, top_k_weights, experts.gate_up_proj, experts.down_proj]
    out_rows = {}
    ref = None
    for impl in impls:
        torch._dynamo.reset()
        experts.config._experts_implementation = "grouped_mm" if impl.startswith("grouped_mm") else "moe_tune"
        module = torch.compile(experts, fullgraph=True) if impl.endswith("+compile") else experts

        def fwd_bwd():
            module(x, top_k_index, top_k_weights).backward(grad)

        try:
            for t in leaves:
                t.grad = None
            out = module(x, top_k_index, top_k_weights)
            out.backward(grad)
            got = [out.detach().float()] + [t.grad.float() for t in leaves]
            if ref is None:
                ref, err = got, 0.0
            else:
                err = max(((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(got, ref))
            del out, got
            for t in leaves:
                t.grad = None
            peak = peak_mib(fwd_bwd)
            ms = do_bench(fwd_bwd, warmup=25, rep=200, grad_to_none=leaves, return_mode="median")
            fwd_ms = do_bench(lambda: module(x, top_k_index, top_k_weights), warmup=10, rep=100,
                              grad_to_none=leaves, return_mode="median")
            out_rows[impl] = {"fwd_bwd_ms": ms, "fwd_ms": fwd_ms, "peak_mib": peak, "max_rel_err": err}
        except Exception as exc:
            out_rows[impl] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        print(f"block {name} T={T} {impl:<20} {out_rows[impl]}", flush=True)
    results.setdefault("block", {})[f"{name}/T{T}"] = out_rows
    del blk, experts
    torch.cuda.empty_cache()
    return out_rows


def host_overhead(shape: MoeShape, results: dict, T=128, iters=20):
    """Host time per experts-block fwd+bwd at a token count where the GPU waits on the host:
    ``iters`` calls back to back after a synchronise, timed before the closing synchronise.
    20 calls × ~20 launches stay inside CUDA's launch queue, so the host never waits on the GPU
    and the figure is the host's own. Gradients are set to None before each call, as a training
    step's ``zero_grad`` leaves them."""
    blk = build_experts(shape)
    experts = blk.experts
    x = torch.randn(T, shape.H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with torch.no_grad():
        _, w, idx = blk.gate(x)
    w = w.detach().requires_grad_()
    grad = torch.randn_like(x)
    leaves = [x, w, experts.gate_up_proj, experts.down_proj]
    rows = {}
    from torch.profiler import ProfilerActivity, profile

    for frozen in (False, True):
        for p in (experts.gate_up_proj, experts.down_proj):
            p.requires_grad_(not frozen)
        for impl in ("grouped_mm", "moe_tune"):
            experts.config._experts_implementation = impl
            samples = []
            for _ in range(5):
                for _ in range(5):
                    experts(x, idx, w).backward(grad)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(iters):
                    for t in leaves:
                        t.grad = None
                    experts(x, idx, w).backward(grad)
                samples.append((time.perf_counter() - t0) / iters * 1e3)
                torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                experts(x, idx, w).backward(grad)
                torch.cuda.synchronize()
            launches = sum(1 for e in prof.events() if e.device_type.name == "CUDA")
            key = impl + ("/frozen" if frozen else "")
            rows[key] = {"host_ms": sorted(samples)[len(samples) // 2], "samples_ms": samples, "cuda_kernels": launches}
            print(f"host T={T} {key:<20} {rows[key]}", flush=True)
    for p in (experts.gate_up_proj, experts.down_proj):
        p.requires_grad_(True)
    results["host"] = rows


def moe_tune_case(shape: MoeShape, T: int):
    """(block, experts module set to moe-tune, x, top_k_index, top_k_weights, output gradient,
    leaves) at ``T`` tokens: the routing from the block's own router, run once."""
    blk = build_experts(shape)
    experts = blk.experts
    experts.config._experts_implementation = "moe_tune"
    x = torch.randn(T, shape.H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with torch.no_grad():
        _, w, idx = blk.gate(x)
    w = w.detach().requires_grad_()
    return blk, experts, x, idx, w, torch.randn_like(x), [x, w, experts.gate_up_proj, experts.down_proj]


def breakdown(shape: MoeShape, T: int, results: dict):
    from torch.profiler import ProfilerActivity, profile

    blk, experts, x, idx, w, grad, leaves = moe_tune_case(shape, T)
    for _ in range(3):
        experts(x, idx, w).backward(grad)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            for t in leaves:  # fresh gradients, as a training step's zero_grad(set_to_none=True) leaves them
                t.grad = None
            experts(x, idx, w).backward(grad)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=20)
    print(table, flush=True)
    results["breakdown"] = table


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--scan", action="store_true")
    parser.add_argument("--configs", help="a probe.json whose scan winners the block uses")
    parser.add_argument("--presets", nargs="*", default=[])
    parser.add_argument("--skip-compile", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "date": time.strftime("%Y-%m-%d")}
    print(results, flush=True)
    qwen = SHAPES["qwen3-30b-a3b"]
    best_by_t = {}
    if args.scan:
        for T in args.tokens:
            best_by_t[T] = scan(qwen, T, results)
            torch.cuda.empty_cache()
        results["best"] = {str(T): {f"{a}/{b}": c.to_dict() for (a, b), c in best.items()} for T, best in best_by_t.items()}
    if args.configs:
        loaded = json.loads(Path(args.configs).read_text())["best"]
        best_by_t = {int(T): {tuple(k.split("/")): KernelConfig.from_dict(v) for k, v in d.items()}
                     for T, d in loaded.items()}
    if best_by_t:
        original = block.block_configs

        def tuned(E, H, I, topk, dtype, num_tokens, info):
            if (E, H, I, topk) == (qwen.E, qwen.H, qwen.I, qwen.topk):
                T = min(best_by_t, key=lambda t: abs(t - num_tokens))
                return dict(best_by_t[T])
            return original(E, H, I, topk, dtype, num_tokens, info)

        block.block_configs = tuned
    impls = ("grouped_mm", "moe_tune") if args.skip_compile else ("grouped_mm", "grouped_mm+compile", "moe_tune",
                                                                  "moe_tune+compile")
    for T in args.tokens:
        time_block(qwen, T, results, "qwen3-30b-a3b", impls)
    host_overhead(qwen, results)
    breakdown(qwen, max(args.tokens), results)
    for name in args.presets:
        time_block(SHAPES[name], 8192, results, name, impls)
    (out / "probe.json").write_text(json.dumps(results, indent=1, default=str))
    print("\nsummary", flush=True)
    for key, rows in results.get("block", {}).items():
        base = min((r["fwd_bwd_ms"] for i, r in rows.items() if i.startswith("grouped_mm") and "fwd_bwd_ms" in r),
                   default=float("nan"))
        for impl, r in rows.items():
            if "fwd_bwd_ms" in r:
                print(f"{key:<28} {impl:<20} {r['fwd_bwd_ms']:7.3f} ms  x{base / r['fwd_bwd_ms']:.2f}  "
                      f"peak {r['peak_mib']:7.0f} MiB  err {r['max_rel_err']:.1e}")
            else:
                print(f"{key:<28} {impl:<20} {r}")


if __name__ == "__main__":
    main()
