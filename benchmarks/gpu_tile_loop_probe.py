"""The grouped GEMMs' tile loop, three ways, problem by problem, on one GPU.

``TILE_LOOP`` of both grouped-GEMM kernels: 0 is the plain persistent loop (each tile's reduction
pipeline fills and drains on its own, and the epilogue runs with no copies in flight); 1 asks Triton
to flatten the tile loop with the reduction loop, so its software pipeline issues the next tile's
first copies during this tile's last MMAs and store; 2 (dW only) warp-specialises the tile loop
instead of the reduction loop, so the producer warpgroup runs ahead across tiles while the
consumers store. For each of a model's six problems at each token count: the config the runtime
resolves today with each loop, then a small grid around it — every launch gated against the
float32 reference on a NaN-poisoned output, timed with ``triton.testing.do_bench`` (median).
Writes ``OUT/tile_loop_probe.json`` and prints the best of each loop per problem.

    python3 benchmarks/gpu_tile_loop_probe.py --out DIR [--model qwen3-30b-a3b] [--tokens 4096 16384]
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import probe_args  # noqa: E402

_LOOP = {"mode": 0}


def _with_tile_loop():
    """Every grouped-GEMM launch from here on takes ``_LOOP['mode']`` as its TILE_LOOP."""
    from moe_tune.kernels.grouped_mm import grouped_mm_dw_kernel, grouped_mm_kernel
    from moe_tune.ops import launch

    plain = launch.launch_kernel

    def launch_kernel(kernel, in_op, grid, args, meta, outputs):
        if kernel in (grouped_mm_kernel, grouped_mm_dw_kernel):
            meta = dict(meta, TILE_LOOP=_LOOP["mode"])
        plain(kernel, in_op, grid, args, meta, outputs)

    launch.launch_kernel = launch_kernel


def candidates(problem, tuned):
    """(TILE_LOOP, config) pairs: the tuned config with each loop, then neighbours."""
    from moe_tune.problem import KernelConfig

    if problem.pass_ == "dw":
        yield 0, tuned
        yield 1, tuned
        if tuned.WARP_SPEC:
            yield 2, tuned
            plain = dataclasses.replace(tuned, WARP_SPEC=False, num_warps=8)
            yield 0, plain
            yield 1, plain
        for bm, (bn, bk), st in itertools.product((32, 64), ((128, 256), (128, 128), (256, 128)), (2, 3, 4)):
            cfg = KernelConfig(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=4, num_stages=st,
                               TMA_LOAD=True, TMA_STORE=True, WARP_SPEC=True)
            if cfg != tuned:
                yield 2, cfg
    else:
        yield 0, tuned
        yield 1, tuned
        for st, bk in itertools.product((3, 4, 5), (64, 128)):
            cfg = dataclasses.replace(tuned, num_stages=st, BLOCK_K=bk)
            if cfg != tuned:
                yield 1, cfg


def main(argv=None) -> int:
    args, out_dir = probe_args.parse(argv, __doc__.splitlines()[0], [4096, 16384])

    import torch

    from moe_tune import models, runtime
    from moe_tune.device import query_device
    from moe_tune.space import why_illegal
    from moe_tune.tuning.cases import Case
    from moe_tune.tuning.routing_spec import RoutingSpec

    _with_tile_loop()
    info = query_device(torch.device("cuda"))
    shape = models.load_preset(args.model)
    rows = []
    t0 = time.time()
    for T in args.tokens:
        for p in shape.problems():
            case = Case(p, T, RoutingSpec(), 0, "cuda")
            flops = p.flops(T)
            tuned = runtime.get_config(p, T, info)
            best: dict[int, dict] = {}
            for mode, cfg in candidates(p, tuned):
                if why_illegal(p, cfg, info) is not None:
                    continue
                _LOOP["mode"] = mode
                row = dict(T=T, problem=p.key, loop=mode, config=cfg.short(), tuned=cfg == tuned)
                try:
                    out = case.launch(cfg)
                    ref = case.reference.float()
                    err = ((out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
                    if not err < 2e-2:  # NaN (an unwritten tile of the poisoned output) fails too
                        raise RuntimeError(f"error {err:.2e}")
                    o = case.new_output()
                    ms = probe_args.median_ms(lambda: case.launch(cfg, o))
                    row.update(ms=ms, tflops=flops / ms / 1e9, err=err)
                except Exception as exc:  # a config that fails is a row, not the end of the probe
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                rows.append(row)
                if "ms" in row and (mode not in best or row["ms"] < best[mode]["ms"]):
                    best[mode] = row
            base = next((r for r in rows if r["T"] == T and r["problem"] == p.key and r["loop"] == 0 and r["tuned"]
                         and "ms" in r), None)
            parts = []
            for mode, r in sorted(best.items()):
                ratio = base["ms"] / r["ms"] if base else float("nan")
                parts.append(f"loop {mode}: {r['ms']:.4f} ms {r['tflops']:.0f} TFLOP/s ({r['config']}) {ratio:.3f}x")
            print(f"T={T} {p.key}: " + "; ".join(parts) + f"  t={time.time() - t0:.0f}s", flush=True)
            (out_dir / "tile_loop_probe.json").write_text(json.dumps(dict(device=info.name, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
