"""dW with one flattened loop over (tile, row step) (``FLAT``) against the cached dW configs.

A dW tile reduces over one expert's rows: 2-16 row steps at common token counts, so the row
loop's pipeline drains at every tile. ``FLAT`` keeps it full across tiles. For each preset, token
count and dW problem this times the config the runtime resolves, that config flattened (pointer
loads, no warp specialisation), and a grid of flattened tilings; every config is gated once
against the float32 reference. The fastest few then run interleaved (each round times every one
of them once, order reversed every other round). Writes ``OUT/flat.json``.

    python3 benchmarks/gpu_flat_probe.py --out DIR --models qwen3-30b-a3b gpt-oss-120b --tokens 4096 16384
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import probe_args  # noqa: E402


def flat_grid(problem, info):
    from moe_tune.problem import KernelConfig
    from moe_tune.space import PREDICATES, why_illegal

    out = []
    for bm in (32, 64):
        for bn, bk in ((128, 128), (128, 256), (256, 128), (64, 256)):
            for w in (4, 8):
                for s in (3, 4):
                    for p in (1, 2):
                        cfg = KernelConfig(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=s,
                                           TMA_STORE=True, PROGRAMS_PER_SM=p, FLAT=True)
                        if why_illegal(problem, cfg, info, PREDICATES) is None:
                            out.append(cfg)
    return out


def flattened(cfg):
    return dataclasses.replace(cfg, TMA_LOAD=False, WARP_SPEC=False, GATHER_COPY=False, FLAT=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", nargs="+", default=["qwen3-30b-a3b"])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--finalists", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=480.0, help="stop timing new points after this")
    args = ap.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    import torch

    from moe_tune import models, runtime
    from moe_tune.device import query_device
    from moe_tune.tuning.cases import Case
    from moe_tune.tuning.routing_spec import RoutingSpec
    from moe_tune.tuning.workers import WorkerPool

    info = query_device(torch.device("cuda"))
    points = []
    for model in args.models:
        for problem in (p for p in models.load_preset(model).problems() if p.pass_ == "dw"):
            for tokens in args.tokens:
                cached = runtime.get_config(problem, tokens, info)
                configs = [cached, flattened(cached)] + flat_grid(problem, info)
                unique = list(dict.fromkeys(configs))
                points.append((model, problem, tokens, unique))

    # Compile every (problem, config) once, in parallel, before any timing.
    jobs = {(p, c) for _, p, _, cs in points for c in cs}
    t0 = time.perf_counter()
    with WorkerPool(14) as pool:
        futures = [pool.submit({"op": "compile", "problem": p.to_dict(), "config": c.to_dict(), "tokens": [4096]}, 600)
                   for p, c in jobs]
        failed = [f.result() for f in futures if not f.result().get("ok")]
    print(f"compiled {len(jobs)} in {time.perf_counter() - t0:.0f} s, {len(failed)} failed", flush=True)
    for f in failed[:5]:
        print("  ", f.get("error", "")[:300], flush=True)

    report = []
    for model, problem, tokens, configs in points:
        if time.perf_counter() - start > args.budget_s:
            print(f"budget spent: skipping {model} {problem.key} T={tokens}", flush=True)
            continue
        case = Case(problem, tokens, RoutingSpec(), 0, "cuda")
        rows = [dict(config=c.short(), role="cache" if i == 0 else "", **probe_args.time_config(case, c))
                for i, c in enumerate(configs)]
        ok = sorted((i for i, r in enumerate(rows) if "ms" in r), key=lambda i: rows[i]["ms"])
        finalists = list(dict.fromkeys([0] + ok[:args.finalists]))
        finalists = [i for i in finalists if "ms" in rows[i]]
        outs = {i: case.new_output() for i in finalists}
        times = {i: [] for i in finalists}
        for r in range(args.rounds):
            for i in finalists[:: 1 if r % 2 == 0 else -1]:
                times[i].append(probe_args.median_ms(lambda: case.launch(configs[i], outs[i])))
        ab = [dict(config=rows[i]["config"], median_ms=statistics.median(times[i]), ms=times[i]) for i in finalists]
        base = ab[0]["median_ms"]
        for row in ab:
            print(f"{model} T={tokens} {problem.gemm} dW: {row['config']:40s} {row['median_ms']:.4f} ms "
                  f"({base / row['median_ms']:.3f}x the cache)", flush=True)
        report.append(dict(model=model, problem=problem.key, tokens=tokens, rows=rows, ab=ab))
        del case, outs
        torch.cuda.empty_cache()
        (out_dir / "flat.json").write_text(json.dumps(dict(device=info.name, points=report), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
