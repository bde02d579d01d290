"""Warp-specialised grouped GEMMs against the tuned ones, problem by problem, on one GPU.

For each of a model's six problems (and the plain expert-ordered forward/dx that a block which
sorts its rows first would run), at each token count: the config the runtime resolves today (the
shipped cache, or the heuristic default), then every WARP_SPEC candidate of a small grid that
``moe_tune.space`` admits — each gated against the float32 reference and timed with
``triton.testing.do_bench`` (median). Plus the dense bf16 rate (torch.mm) and the row copy the
sorted variants would need. Writes ``OUT/ws_probe.json`` and prints a table.

    python3 benchmarks/gpu_ws_probe.py --out DIR [--model qwen3-30b-a3b] [--tokens 4096 16384]
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import probe_args  # noqa: E402


def ws_grid(problem):
    from moe_tune.problem import KernelConfig

    if problem.pass_ == "dw":
        for bm, bn, bk, st in itertools.product((32, 64, 128), (64, 128, 256), (64, 128, 256), (2, 3, 4)):
            yield KernelConfig(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=4, num_stages=st,
                               TMA_LOAD=True, TMA_STORE=True, WARP_SPEC=True)
    else:
        for bm, bn, bk, st in itertools.product((128, 256), (128, 256), (64, 128), (3, 4)):
            yield KernelConfig(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=4, num_stages=st,
                               TMA_LOAD=True, TMA_STORE=True, WARP_SPEC=True)


def main(argv=None) -> int:
    args, out_dir = probe_args.parse(argv, __doc__.splitlines()[0], [4096, 16384])

    import torch

    from moe_tune import models, runtime
    from moe_tune.device import query_device
    from moe_tune.problem import Problem
    from moe_tune.space import why_illegal
    from moe_tune.tuning.cases import Case
    from moe_tune.tuning.routing_spec import RoutingSpec

    info = query_device(torch.device("cuda"))
    shape = models.load_preset(args.model)
    problems = shape.problems()
    extra = [Problem("forward", shape.E, 2 * shape.I, shape.H, shape.topk),  # up forward on sorted X
             Problem("dx", shape.E, shape.H, shape.I, shape.topk)]  # down dx on sorted dY
    rows = []
    t0 = time.time()

    bench = probe_args.median_ms

    for T in args.tokens:
        M = T * shape.topk
        a = torch.randn(M, shape.H, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(shape.H, 2 * shape.I, device="cuda", dtype=torch.bfloat16)
        dense_ms = bench(lambda: a @ b)
        dense = 2 * M * shape.H * 2 * shape.I / dense_ms / 1e9
        idx = torch.randint(0, T, (M,), device="cuda")
        x = torch.randn(T, shape.H, device="cuda", dtype=torch.bfloat16)
        copy_ms = bench(lambda: x.index_select(0, idx))
        rows.append(dict(kind="dense", T=T, ms=dense_ms, tflops=dense, copy_ms=copy_ms))
        print(f"T={T}: dense {dense:.0f} TFLOP/s, row copy [M, H] {copy_ms:.3f} ms", flush=True)
        for p in problems + extra:
            case = Case(p, T, RoutingSpec(), 0, "cuda")
            base = runtime.get_config(p, T, info)
            cands = [("tuned", base)] + [("ws", c) for c in ws_grid(p) if why_illegal(p, c, info) is None]
            best = {}
            for label, cfg in cands:
                row = dict(kind=label, T=T, problem=p.key, config=cfg.short(), **probe_args.time_config(case, cfg))
                rows.append(row)
                if "ms" in row and (label not in best or row["ms"] < best[label]["ms"]):
                    best[label] = row
            tb, wb = best.get("tuned"), best.get("ws")
            ratio = tb["ms"] / wb["ms"] if tb and wb else float("nan")
            show = lambda r: f"{r['ms']:.4f} ms {r['tflops']:.0f} TFLOP/s ({r['config']})" if r else "-"  # noqa: E731
            print(f"T={T} {p.key}: tuned {show(tb)}, ws best {show(wb)} = {ratio:.3f}x  t={time.time() - t0:.0f}s",
                  flush=True)
            (out_dir / "ws_probe.json").write_text(json.dumps(dict(device=info.name, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
