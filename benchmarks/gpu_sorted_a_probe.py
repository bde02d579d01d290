"""Gathered-A GEMMs against a row copy plus the same GEMM on rows already in expert order.

The experts blocks' up forward and down dx read their A rows gathered (``slot // k``), so A comes
through pointer loads and Triton's warp specialisation (which needs every load through TMA) is
out. Copying A's rows to expert order first (``gather_rows``) makes both possible. The ninth
session measured that for Qwen3-30B-A3B on an H100 (≤ 4% for the GEMM, less than the copy);
gpt-oss's up forward reads ~500 TFLOP/s against ~600 for its up dx (same FLOPs), so here, per
preset and token count: the block's problem with the config the runtime resolves, the row copy,
and the expert-ordered problem over a small grid of configs (plain and warp-specialised), each
gated against the float32 reference on a NaN-poisoned output. The grid is compiled first in a
pool of processes (``launch.compile_only``), then timed in this one. Writes ``OUT/sorted_a.json``.
Configs are timed one after another, so a 3-4 ms GEMM can read ±10% with the card's clock: read a
gain here as a lead and settle it with ``gpu_ab_probe.py`` (interleaved rounds) or a sweep
(its head to head is interleaved too). The fifteenth session's 1.11× at gpt-oss-20b × 16384 did not
survive that (BENCHMARKS.md).

    python3 benchmarks/gpu_sorted_a_probe.py --out DIR [--presets qwen3-30b-a3b gpt-oss-20b] [--tokens 4096 16384]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import probe_args  # noqa: E402


def grid():
    from moe_tune.problem import KernelConfig

    plain = [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 256, 32, 8, 5), (128, 128, 64, 4, 4),
             (256, 128, 64, 8, 3)]
    for bm, bn, bk, warps, stages in plain:
        for store in (False, True):
            yield KernelConfig(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages,
                               TMA_LOAD=True, TMA_STORE=store)
    for bm, bn, bk, stages in ((128, 256, 64, 3), (128, 256, 64, 4), (128, 128, 64, 4), (128, 128, 128, 3),
                               (128, 256, 32, 4)):
        yield KernelConfig(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=4, num_stages=stages,
                           TMA_LOAD=True, TMA_STORE=True, WARP_SPEC=True)


def sorted_problem(p):
    """The same GEMM with A already in expert order (and, for dx, unweighted: the blocks' is)."""
    if p.pass_ == "forward":
        return dataclasses.replace(p, gather=False)
    return dataclasses.replace(p, scatter=False, weighted=False)


def _compile(problem_dict: dict, tokens: int, cfg_dict: dict) -> str | None:
    from moe_tune.ops.launch import compile_only
    from moe_tune.problem import KernelConfig, Problem
    from moe_tune.tuning.cases import Case
    from moe_tune.tuning.routing_spec import RoutingSpec

    try:
        case = Case(Problem.from_dict(problem_dict), tokens, RoutingSpec(), 0, "cuda", with_reference=False,
                    compile_only=True)
        with compile_only():
            case.launch(KernelConfig.from_dict(cfg_dict))
        return None
    except Exception as exc:  # a config the compiler refuses is a row, timed as an error later
        return f"{type(exc).__name__}: {str(exc)[:200]}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--presets", nargs="+", default=["qwen3-30b-a3b", "gpt-oss-20b", "gpt-oss-120b"])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    args = ap.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    import torch

    from moe_tune import models, runtime
    from moe_tune.device import query_device
    from moe_tune.ops.rows import gather_rows
    from moe_tune.space import why_illegal
    from moe_tune.tuning.cases import Case
    from moe_tune.tuning.routing_spec import RoutingSpec

    info = query_device(torch.device("cuda"))
    plan = []  # (preset, T, block problem, its config, sorted problem, sorted configs)
    for preset in args.presets:
        shape = models.load_preset(preset)
        for T in args.tokens:
            for p in shape.problems():
                if (p.gemm, p.pass_) not in (("up", "forward"), ("down", "dx")):
                    continue
                q = sorted_problem(p)
                configs = [runtime.get_config(q, T, info)]
                configs += [c for c in grid() if c not in configs and why_illegal(q, c, info) is None]
                plan.append((preset, T, p, runtime.get_config(p, T, info), q, configs))

    t0 = time.time()
    jobs = [(p, T, c) for _, T, p, c, _, _ in plan] + [(q, T, c) for _, T, _, _, q, cs in plan for c in cs]
    workers = max(1, min(14, (os.cpu_count() or 2) - 2))
    import multiprocessing

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        failed = list(pool.map(_compile, [p.to_dict() for p, _, _ in jobs], [T for _, T, _ in jobs],
                               [c.to_dict() for _, _, c in jobs]))
    print(f"compiled {len(jobs)} launches in {time.time() - t0:.0f} s ({sum(f is not None for f in failed)} failed)",
          flush=True)

    rows = []
    for preset, T, p, cfg, q, configs in plan:
        gathered = Case(p, T, RoutingSpec(), 0, "cuda")
        result = dict(preset=preset, T=T, problem=p.key, config=cfg.short(), gathered=probe_args.time_config(gathered, cfg))
        width = p.K if p.pass_ == "forward" else p.N
        src = torch.randn(T, width, device="cuda").to(torch.bfloat16)
        dst = torch.empty(T * p.topk, width, device="cuda", dtype=torch.bfloat16)
        slots = gathered.routing.sorted_slots
        result["copy_ms"] = probe_args.median_ms(lambda: gather_rows(src, slots, p.topk, dst))
        del gathered
        case = Case(q, T, RoutingSpec(), 0, "cuda")
        result["sorted"] = [dict(config=c.short(), **probe_args.time_config(case, c)) for c in configs]
        del case
        rows.append(result)
        ok = [r for r in result["sorted"] if "ms" in r]
        best = min(ok, key=lambda r: r["ms"]) if ok else None
        g = result["gathered"].get("ms", float("nan"))
        line = (f"{preset} T={T} {p.gemm} {p.pass_}: gathered {g:.4f} ({cfg.short()}), copy {result['copy_ms']:.4f}")
        if best:
            line += (f", sorted best {best['ms']:.4f} ({best['config']}) -> copy + sorted "
                     f"{best['ms'] + result['copy_ms']:.4f} = {g / (best['ms'] + result['copy_ms']):.3f}x, "
                     f"sorted alone {g / best['ms']:.3f}x")
        print(line, flush=True)
        for r in result["sorted"]:
            print(f"    {r['config']:34s} " + (f"{r['ms']:.4f} {r['tflops']:.0f}" if "ms" in r else r["error"][:120]),
                  flush=True)
        (out_dir / "sorted_a.json").write_text(json.dumps(dict(device=info.name, rows=rows), indent=1))
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
