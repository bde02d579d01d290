"""Half-height tail tiles (``SPLIT_TAIL``) against the tuned forward/dx GEMMs, then in the block.

Part 1, per GEMM: for each forward/dx problem of the model at each token count, the config the
runtime resolves today, the same with ``SPLIT_TAIL``, and a small grid of tail configs, each gated
against the float32 reference on a NaN-poisoned output and timed with ``triton.testing.do_bench``
(median). Also the share of computed rows that are routed rows, with and without the split, for
the routing the cases draw.

Part 2, the experts block fwd+bwd (transformers' Qwen3-MoE experts, compiled as ``moe-tune bench``
compiles them): compiled grouped_mm, compiled moe-tune with the resolved configs, and compiled
moe-tune with ``SPLIT_TAIL`` switched on for its four forward/dx GEMMs, timed in alternating
rounds. Writes ``OUT/tail_probe.json`` and prints a table.

    python3 benchmarks/gpu_tail_probe.py --out DIR [--model qwen3-30b-a3b] [--tokens 1024 4096 16384]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def tail_grid():
    from moe_tune.problem import KernelConfig

    for bn, st, tma_s in itertools.product((128, 256), (3, 4), (False, True)):
        yield KernelConfig(BLOCK_M=128, BLOCK_N=bn, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=st,
                           TMA_LOAD=True, TMA_STORE=tma_s, SPLIT_TAIL=True)


def row_efficiency(counts, block_m: int, split: bool) -> float:
    """Routed rows over the rows the row blocks cover."""
    covered = 0
    for c in counts:
        full, rem = divmod(c, block_m)
        covered += full * block_m + (0 if rem == 0 else block_m // 2 if split and rem <= block_m // 2 else block_m)
    return sum(counts) / max(covered, 1)


def gemm_part(args, shape, info, rows, t0):
    import torch
    import triton

    from moe_tune import runtime
    from moe_tune.space import why_illegal
    from moe_tune.tuning.cases import Case
    from moe_tune.tuning.routing_spec import RoutingSpec

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")

    for T in args.tokens:
        for p in [p for p in shape.problems() if p.pass_ != "dw"]:
            case = Case(p, T, RoutingSpec(), 0, "cuda")
            counts = torch.diff(case.routing.expert_offsets.long()).tolist()
            flops = p.flops(T)
            base = runtime.get_config(p, T, info)
            cands = [("tuned", base), ("tuned+tail", replace(base, SPLIT_TAIL=True))]
            cands += [("grid", c) for c in tail_grid() if why_illegal(p, c, info) is None]
            best = {}
            for label, cfg in cands:
                try:
                    out = case.launch(cfg, case.new_output())
                    ref = case.reference.float()
                    err = ((out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
                    if not err < 2e-2:  # NaN (an unwritten row) fails too
                        raise RuntimeError(f"error {err:.2e}")
                    o = case.new_output()
                    ms = bench(lambda: case.launch(cfg, o))
                    row = dict(part="gemm", kind=label, T=T, problem=p.key, config=cfg.short(), ms=ms,
                               tflops=flops / ms / 1e9, err=err)
                except Exception as exc:  # a config that fails is a row, not the end of the probe
                    row = dict(part="gemm", kind=label, T=T, problem=p.key, config=cfg.short(),
                               error=f"{type(exc).__name__}: {str(exc)[:200]}")
                rows.append(row)
                group = "tuned" if label == "tuned" else "tail"
                if "ms" in row and (group not in best or row["ms"] < best[group]["ms"]):
                    best[group] = row
            tb, sb = best.get("tuned"), best.get("tail")
            ratio = tb["ms"] / sb["ms"] if tb and sb else float("nan")
            bm = base.BLOCK_M
            eff = (row_efficiency(counts, bm, False), row_efficiency(counts, bm, True))
            show = lambda r: f"{r['ms']:.4f} ms {r['tflops']:.0f} TFLOP/s ({r['config']})" if r else "-"  # noqa: E731
            print(f"T={T} {p.key}: tuned {show(tb)}, tail best {show(sb)} = {ratio:.3f}x; rows used "
                  f"{eff[0]:.3f} -> {eff[1]:.3f} at BLOCK_M {bm}  t={time.time() - t0:.0f}s", flush=True)


def block_part(args, shape, rows, t0):
    import torch

    from moe_tune.bench import block as bench_block
    from moe_tune.bench.timing import do_bench_timer
    from moe_tune.ops import block as ops_block

    resolve = ops_block.resolve_config

    def with_tail(problem, num_tokens, info):
        cfg = resolve(problem, num_tokens, info)
        return replace(cfg, SPLIT_TAIL=True) if problem.pass_ != "dw" and cfg.BLOCK_M >= 32 and not cfg.WARP_SPEC else cfg

    timer = do_bench_timer(rep_ms=200)
    block = bench_block.build_block(shape, "bfloat16", "cuda")
    for T in args.block_tokens:
        inputs = bench_block.block_inputs(block, shape, T, "bfloat16", "cuda")
        grads = list(inputs.leaves.values())
        prepared = {}
        for label in ("grouped_mm+compile", "moe_tune+compile"):
            prepared[label] = bench_block.prepare(block, label, inputs)
        results = {}
        for variant in ("tuned", "tail"):
            ops_block.resolve_config = with_tail if variant == "tail" else resolve
            ops_block._BLOCK_CONFIGS.clear()
            inputs.clear()
            prepared["moe_tune+compile"].fwd_bwd()  # first call with these configs (compiles the tail kernels)
            results[variant] = {name: t.grad.float().clone() for name, t in inputs.leaves.items()}
            inputs.clear()
        ops_block.resolve_config = resolve
        ops_block._BLOCK_CONFIGS.clear()
        diff = {name: ((results["tail"][name] - results["tuned"][name]).norm()
                       / results["tuned"][name].norm().clamp_min(1e-12)).item() for name in results["tuned"]}
        times = {"grouped_mm+compile": [], "tuned": [], "tail": []}
        for _ in range(args.rounds):
            for variant in times:
                if variant == "grouped_mm+compile":
                    fn = prepared[variant].fwd_bwd
                else:
                    ops_block.resolve_config = with_tail if variant == "tail" else resolve
                    ops_block._BLOCK_CONFIGS.clear()
                    fn = prepared["moe_tune+compile"].fwd_bwd
                times[variant].append(timer(fn, grad_to_none=grads).ms)
                inputs.clear()
        ops_block.resolve_config = resolve
        ops_block._BLOCK_CONFIGS.clear()
        med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        rows.append(dict(part="block", T=T, times=times, median=med, grad_rel_diff_tail_vs_tuned=diff))
        print(f"T={T} block fwd+bwd ms: grouped_mm+compile {med['grouped_mm+compile']:.3f}, moe-tune+compile "
              f"{med['tuned']:.3f} ({med['grouped_mm+compile'] / med['tuned']:.3f}x), with SPLIT_TAIL {med['tail']:.3f} "
              f"({med['grouped_mm+compile'] / med['tail']:.3f}x); grads tail vs tuned {max(diff.values()):.1e}  "
              f"t={time.time() - t0:.0f}s", flush=True)
        del prepared, inputs
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="qwen3-30b-a3b")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 8192, 16384])
    ap.add_argument("--block-tokens", type=int, nargs="*", default=[4096, 16384])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)

    import torch

    from moe_tune import models
    from moe_tune.device import query_device

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = query_device(torch.device("cuda"))
    shape = models.load_preset(args.model)
    rows: list[dict] = []
    t0 = time.time()
    try:
        gemm_part(args, shape, info, rows, t0)
        block_part(args, shape, rows, t0)
    finally:
        (out_dir / "tail_probe.json").write_text(json.dumps(dict(device=info.name, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
