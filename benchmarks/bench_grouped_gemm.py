"""Six grouped-GEMM problems of one MoE layer: moe-tune's kernels against torch._grouped_mm.

For each problem and token count it times (median of ``do_bench``, L2 flushed between runs):

* ``moe-tune``: the launcher with the heuristic default config (``--config cache`` asks the
  runtime loader instead), gather/scatter/weights fused;
* ``grouped_mm``: what a user writes with ``torch._grouped_mm``: index to gather rows, the
  grouped GEMM, then weight/scatter/sum back to the layout the pass must return;
* ``dense``: one cuBLAS matmul of the same FLOPs, the practical ceiling.

Routing metadata is built once, outside every timer. Prints a table and writes JSON with
``--out``. Run: ``python benchmarks/bench_grouped_gemm.py --model qwen3-30b-a3b --tokens 4096 16384``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch
import triton
from triton.testing import do_bench

from moe_tune.device import query_device
from moe_tune.ops import grouped_gemm as gg
from moe_tune.ops.routing import build_routing, random_routing
from moe_tune.problem import MoeShape
from moe_tune.space import default_config

PRESETS = {"qwen3-30b-a3b": MoeShape(E=128, H=2048, I=768, topk=8)}


def environment() -> dict:
    props = torch.cuda.get_device_properties(0)
    try:
        import subprocess

        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:  # nvidia-smi missing: the report still names the card
        driver = "unknown"
    return {
        "card": props.name, "driver": driver, "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }


def timed(fn, warmup_ms=25, rep_ms=100) -> dict:
    fn()  # compile and allocate outside the timer
    torch.cuda.synchronize()
    q20, q50, q80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.2, 0.5, 0.8])
    return {"ms": q50, "p20": q20, "p80": q80}


def build_cases(shape: MoeShape, T: int, dtype, seed: int = 0):
    """Yield (problem, moe-tune fn, grouped_mm fn) for the six problems at T tokens."""
    torch.manual_seed(seed)
    E, H, I, k = shape.E, shape.H, shape.I, shape.topk
    M = T * k
    routing = build_routing(random_routing(T, E, k, device="cuda"), E)
    offs = routing.expert_offsets[1:].contiguous()
    slots = routing.sorted_slots.long()
    tokens_of_rows = slots // k
    w_route = torch.rand(M, device="cuda")
    w_route_rows = w_route[slots]

    x = torch.randn(T, H, device="cuda", dtype=dtype)
    w1 = torch.randn(E, 2 * I, H, device="cuda", dtype=dtype) / H**0.5
    w2 = torch.randn(E, H, I, device="cuda", dtype=dtype) / I**0.5
    a = torch.randn(M, I, device="cuda", dtype=dtype)  # down input, expert order
    dy_up = torch.randn(M, 2 * I, device="cuda", dtype=dtype)  # grad of up output, expert order
    dy_down = torch.randn(M, H, device="cuda", dtype=dtype)  # grad of down output, slot order
    problems = shape.problems(dtype=str(dtype).removeprefix("torch."))
    p = {q.pass_: q for q in problems[:3]}  # up: forward, dx, dw
    d = {q.pass_: q for q in problems[3:]}  # down
    info = query_device()

    def cfg(problem):
        return default_config(problem, info)

    # -- up (gate_up): X gathered from token order ------------------------------------------------
    def up_fwd_ref():
        return torch._grouped_mm(x[tokens_of_rows], w1.transpose(1, 2), offs=offs)

    def up_dx_ref():
        d_rows = torch._grouped_mm(dy_up, w1, offs=offs)
        out = torch.empty_like(d_rows)
        out[slots] = d_rows
        return out.view(T, k, H).sum(1)

    def up_dw_ref():
        return torch._grouped_mm(dy_up.t(), x[tokens_of_rows], offs=offs)

    # -- down: output scattered to slot order, times routing weight ---------------------------------
    def down_fwd_ref():
        y_rows = torch._grouped_mm(a, w2.transpose(1, 2), offs=offs) * w_route_rows[:, None].to(dtype)
        out = torch.empty_like(y_rows)
        out[slots] = y_rows
        return out

    def down_dx_ref():
        g = dy_down[slots] * w_route_rows[:, None].to(dtype)
        return torch._grouped_mm(g, w2, offs=offs)

    def down_dw_ref():
        g = dy_down[slots] * w_route_rows[:, None].to(dtype)
        return torch._grouped_mm(g.t(), a, offs=offs)

    yield (p["forward"], lambda: gg.forward(x, w1, routing, gather=True, config=cfg(p["forward"])), up_fwd_ref)
    yield (p["dx"], lambda: gg.backward_dx(dy_up, w1, routing, gather=True, config=cfg(p["dx"])), up_dx_ref)
    yield (p["dw"], lambda: gg.backward_dw(dy_up, x, w1.shape, routing, gather=True, config=cfg(p["dw"])),
           up_dw_ref)
    kw = dict(scatter=True, weights=w_route)
    yield (d["forward"], lambda: gg.forward(a, w2, routing, config=cfg(d["forward"]), **kw), down_fwd_ref)
    yield (d["dx"], lambda: gg.backward_dx(dy_down, w2, routing, config=cfg(d["dx"]), **kw), down_dx_ref)
    yield (d["dw"], lambda: gg.backward_dw(dy_down, a, w2.shape, routing, config=cfg(d["dw"]), **kw), down_dw_ref)


def dense_ceiling(problem, T: int, dtype) -> dict:
    M = T * problem.topk
    a = torch.randn(M, problem.K, device="cuda", dtype=dtype)
    b = torch.randn(problem.K, problem.N, device="cuda", dtype=dtype)
    return timed(lambda: a @ b)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3-30b-a3b", choices=sorted(PRESETS))
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_grouped_gemm: needs a CUDA GPU", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    env = environment()
    print(f"# {env['card']} | driver {env['driver']} | torch {env['torch']} | triton {env['triton']} | {env['date']}")
    rows = []
    for T in args.tokens:
        for problem, ours, ref in build_cases(PRESETS[args.model], T, dtype):
            flops = problem.flops(T)
            r_ours, r_ref = timed(ours), timed(ref)
            r_dense = dense_ceiling(problem, T, dtype)
            row = {
                "T": T, "gemm": problem.gemm, "pass": problem.pass_, "problem": problem.key,
                "config": default_config(problem, query_device()).to_dict(),
                "moe_tune": r_ours, "grouped_mm": r_ref, "dense": r_dense,
                "tflops": {name: flops / (r["ms"] * 1e-3) / 1e12
                           for name, r in (("moe_tune", r_ours), ("grouped_mm", r_ref), ("dense", r_dense))},
            }
            row["ratio_vs_grouped_mm"] = r_ref["ms"] / r_ours["ms"]
            rows.append(row)
            print(f"T={T:6d} {problem.gemm:4s} {problem.pass_:7s} moe-tune {row['tflops']['moe_tune']:6.1f} "
                  f"grouped_mm {row['tflops']['grouped_mm']:6.1f} dense {row['tflops']['dense']:6.1f} TFLOP/s "
                  f"ratio {row['ratio_vs_grouped_mm']:.2f}x", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"environment": env, "model": args.model, "dtype": args.dtype, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
