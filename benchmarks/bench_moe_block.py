"""The experts block of a Qwen3-MoE layer: moe-tune's ``moe_experts`` against transformers'
``grouped_mm`` experts implementation, forward and forward+backward.

One ``Qwen3MoeSparseMoeBlock`` is built from a config with random weights (no download) and its
experts module is timed under both implementations, with the same weights and the same routing:
the router runs once, outside every timer, and its ``top_k_index``/``top_k_weights`` are reused.
Forward times a training forward (autograd recording); forward+backward adds the backward of a
fixed output gradient into every input (hidden states, both weight stacks, routing weights).
``do_bench`` medians with p20/p80 spread, warmup excluded; peak memory of one fwd+bwd beside.
moe-tune's configs come from the runtime loader (the cache, else the heuristic default); the
source of each of the six is printed.

Run: ``python benchmarks/bench_moe_block.py --out results/block.json`` (``--tokens``, ``--compile``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from triton.testing import do_bench

from bench_grouped_gemm import environment

from moe_tune import runtime
from moe_tune.device import query_device
from moe_tune.problem import MoeShape

# Qwen3-30B-A3B (also Coder-30B-A3B): per-expert shapes
SHAPE = MoeShape(E=128, H=2048, I=768, topk=8)

# DESIGN.md: transformers 5.17 grouped_mm experts block, fwd+bwd, one H200 (ms); targets are
# moe-tune at least 2x faster at 16384 tokens and 1.5x at 4096.
ANCHOR_MS = {4096: 5.29, 16384: 17.46}
TARGET_RATIO = {4096: 1.5, 16384: 2.0}


def build_block(dtype):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    config = Qwen3MoeConfig(hidden_size=SHAPE.H, moe_intermediate_size=SHAPE.I, num_experts=SHAPE.E,
                            num_experts_per_tok=SHAPE.topk, norm_topk_prob=True)
    torch.manual_seed(0)
    block = Qwen3MoeSparseMoeBlock(config)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return block.to("cuda", dtype)


def config_sources(T: int, dtype) -> dict:
    info = query_device()
    sources = {}
    for problem in SHAPE.problems(str(dtype).removeprefix("torch.")):
        res = runtime.explain(problem, T, info)
        sources[problem.key] = {"source": res.source, "bucket": res.bucket, "config": res.config.short()}
    return sources


def timed(fn, grad_to_none, warmup_ms=25, rep_ms=100) -> dict:
    # grad_to_none: each backward writes fresh gradients instead of accumulating into old ones
    # (an extra read-modify-write of both weight stacks, ~1.6 GB, that training does not pay).
    q20, q50, q80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                             quantiles=[0.2, 0.5, 0.8])
    return {"ms": q50, "p20": q20, "p80": q80}


def peak_memory_mb(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_tokens(block, T: int, dtype, compile_ours: bool) -> dict:
    experts = block.experts
    x = torch.randn(T, SHAPE.H, device="cuda", dtype=dtype)
    with torch.no_grad():
        _, top_k_weights, top_k_index = block.gate(x)
    x.requires_grad_()
    top_k_weights = top_k_weights.detach().requires_grad_()
    grad = torch.randn(T, SHAPE.H, device="cuda", dtype=dtype)
    leaves = [x, top_k_weights, experts.gate_up_proj, experts.down_proj]

    def clear():
        for t in leaves:
            t.grad = None

    variants = [("grouped_mm", "grouped_mm", experts), ("moe_tune", "moe_tune", experts)]
    if compile_ours:
        variants.append(("moe_tune+compile", "moe_tune", torch.compile(experts, fullgraph=True)))
    result = {"T": T}
    for label, impl, module in variants:
        experts.config._experts_implementation = impl

        def fwd():
            return module(x, top_k_index, top_k_weights)

        def fwd_bwd():
            module(x, top_k_index, top_k_weights).backward(grad)

        fwd_bwd()  # compile kernels, read caches, allocate: all outside the timers
        clear()
        memory = peak_memory_mb(fwd_bwd)
        clear()
        result[label] = {"fwd": timed(fwd, leaves), "fwd_bwd": timed(fwd_bwd, leaves), "fwd_bwd_peak_mb": memory}
        clear()
    for label in result:
        if label not in ("T", "grouped_mm"):
            result[label]["ratio_fwd"] = result["grouped_mm"]["fwd"]["ms"] / result[label]["fwd"]["ms"]
            result[label]["ratio_fwd_bwd"] = result["grouped_mm"]["fwd_bwd"]["ms"] / result[label]["fwd_bwd"]["ms"]
    result["configs"] = config_sources(T, dtype)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--compile", action="store_true", help="also time moe-tune under torch.compile(fullgraph=True)")
    parser.add_argument("--out", help="write the results as JSON to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_moe_block: needs a CUDA GPU", file=sys.stderr)
        return 2
    try:
        import transformers
        from moe_tune.integrations.transformers import register
    except ImportError:
        print("bench_moe_block: needs transformers>=5 (pip install 'transformers>=5')", file=sys.stderr)
        return 2
    register()
    dtype = getattr(torch, args.dtype)
    env = {**environment(), "transformers": transformers.__version__}
    print(f"# {env['card']} | driver {env['driver']} | torch {env['torch']} | triton {env['triton']} "
          f"| transformers {env['transformers']} | {env['date']}")
    print(f"# Qwen3-30B-A3B experts: E={SHAPE.E} H={SHAPE.H} I={SHAPE.I} k={SHAPE.topk}, {args.dtype}; "
          "ms = do_bench median [p20, p80]")
    block = build_block(dtype)
    rows = []
    for T in args.tokens:
        row = bench_tokens(block, T, dtype, args.compile)
        rows.append(row)
        for problem, src in row["configs"].items():
            print(f"  config {problem:52s} {src['config']:28s} from {src['source']}"
                  + (f" (bucket {src['bucket']})" if src["bucket"] is not None else ""))
        for label in [k for k in row if k not in ("T", "configs")]:
            r = row[label]
            line = (f"T={T:6d} {label:17s} fwd {r['fwd']['ms']:7.3f} ms [{r['fwd']['p20']:.3f}, {r['fwd']['p80']:.3f}]"
                    f"  fwd+bwd {r['fwd_bwd']['ms']:7.3f} ms [{r['fwd_bwd']['p20']:.3f}, {r['fwd_bwd']['p80']:.3f}]"
                    f"  peak {r['fwd_bwd_peak_mb']:7.0f} MiB")
            if "ratio_fwd_bwd" in r:
                line += f"  ratio fwd {r['ratio_fwd']:.2f}x fwd+bwd {r['ratio_fwd_bwd']:.2f}x"
                if T in TARGET_RATIO:
                    line += f" (target {TARGET_RATIO[T]:.1f}x)"
            elif T in ANCHOR_MS:
                line += f"  (DESIGN.md anchor on H200: {ANCHOR_MS[T]:.2f} ms)"
            print(line, flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"environment": env, "shape": vars(SHAPE), "dtype": args.dtype, "anchors_ms": ANCHOR_MS,
                       "target_ratio": TARGET_RATIO, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
