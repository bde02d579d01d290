"""Two programs per SM against one: does a second resident program hide a GEMM's epilogue?

The grouped GEMMs run a persistent grid of one program per SM, which streams its tiles one after
another: a tile's epilogue (accumulator conversion, the store) stalls that SM's tensor cores. At
4096 tokens a dW tile reduces over only ~256 rows, so the store of its 128x256 output is a large
share of each tile. With two programs per SM (``PROGRAMS_PER_SM=2``: the grid and the tile stride doubled),
one program's epilogue can run beside the other's main loop, if registers and shared memory let
both stay resident.

For each of a model's six problems at each token count: the config the runtime resolves (the
shipped cache), then a grid of tilings small enough for two programs per SM, each at one and two
programs per SM, gated against the float32 reference and timed (do_bench median). Each row
records the compiled kernel's registers, spills and shared memory. Writes ``OUT/occupancy.json``.

    python3 benchmarks/gpu_occupancy_probe.py --out DIR [--model qwen3-30b-a3b] [--tokens 4096] [--passes dw]
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import probe_args  # noqa: E402

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): about 100 KiB of shared memory or less.
FORWARD_TILES = [(128, 128, 64, 4, 3), (128, 128, 64, 8, 3), (64, 256, 64, 4, 2), (128, 128, 32, 4, 4),
                 (128, 256, 64, 8, 2), (128, 256, 32, 8, 3)]
DW_TILES = [(64, 128, 128, 4, 2), (32, 128, 128, 4, 4), (64, 128, 64, 4, 3), (64, 128, 128, 8, 3),
            (64, 64, 256, 4, 2), (32, 128, 256, 8, 2), (64, 128, 256, 4, 3)]


def last_compiled(pass_: str) -> dict:
    """Registers, spills and shared memory of the kernel launched last for ``pass_``."""
    from moe_tune.kernels.grouped_mm import grouped_mm_dw_kernel, grouped_mm_kernel
    from moe_tune.ops import launch

    launcher = launch._LAUNCHERS.get(grouped_mm_dw_kernel if pass_ == "dw" else grouped_mm_kernel)
    if launcher is None or not launcher.compiled:
        return {}
    compiled = list(launcher.compiled.values())[-1][0]
    return dict(regs=compiled.n_regs, spills=compiled.n_spills, shared=compiled.metadata.shared)


def grid(problem, tuned):
    from moe_tune.problem import KernelConfig

    if problem.pass_ == "dw":
        for bm, bn, bk, w, s in DW_TILES:
            for load, store in ((True, True), (True, False), (False, True)):
                yield KernelConfig(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=s,
                                   TMA_LOAD=load, TMA_STORE=store)
    else:
        for bm, bn, bk, w, s in FORWARD_TILES:
            yield KernelConfig(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=s,
                               TMA_LOAD=tuned.TMA_LOAD, TMA_STORE=tuned.TMA_STORE)


def main(argv=None) -> int:
    import argparse

    only = argparse.ArgumentParser(add_help=False)
    only.add_argument("--passes", nargs="+", choices=("forward", "dx", "dw"), default=None)
    picked, rest = only.parse_known_args(argv)
    args, out_dir = probe_args.parse(rest, __doc__.splitlines()[0], [4096])

    import torch

    from moe_tune import models, runtime
    from moe_tune.device import query_device
    from moe_tune.space import why_illegal
    from moe_tune.tuning.cases import Case
    from moe_tune.tuning.routing_spec import RoutingSpec

    info = query_device(torch.device("cuda"))
    shape = models.load_preset(args.model)
    rows = []
    t0 = time.time()
    for T in args.tokens:
        for p in shape.problems():
            if picked.passes and p.pass_ not in picked.passes:
                continue
            case = Case(p, T, RoutingSpec(), 0, "cuda")
            tuned = runtime.get_config(p, T, info)
            cands = [("tuned", tuned)] + [("grid", c) for c in grid(p, tuned)
                                          if c != tuned and why_illegal(p, c, info) is None]
            best = {}
            for label, cfg in cands:
                for n in (1, 2):
                    if label == "tuned" and n == 2 and cfg.WARP_SPEC:
                        continue  # 12 warps with reallocated registers: one program per SM at most
                    at_n = dataclasses.replace(cfg, PROGRAMS_PER_SM=n)
                    row = dict(kind=label, programs=n, T=T, problem=p.key, config=cfg.short(),
                               **probe_args.time_config(case, at_n), **last_compiled(p.pass_))
                    rows.append(row)
                    if "ms" in row and (n not in best or row["ms"] < best[n]["ms"]):
                        best[n] = row
            base = next((r for r in rows if r["kind"] == "tuned" and r["programs"] == 1 and r["T"] == T
                         and r["problem"] == p.key and "ms" in r), None)
            for n, r in sorted(best.items()):
                ratio = base["ms"] / r["ms"] if base else float("nan")
                print(f"T={T} {p.key}: best at {n}/SM {r['ms']:.4f} ms ({r['config']}, regs {r.get('regs')}, "
                      f"smem {r.get('shared')}) = {ratio:.3f}x tuned", flush=True)
            print(f"  tuned {base['ms'] if base else '-'} ms  t={time.time() - t0:.0f}s", flush=True)
            (out_dir / "occupancy.json").write_text(json.dumps(dict(device=info.name, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
