"""Scattered rows against expert-ordered rows for the block's two slot-summed GEMMs.

The experts block's down forward and up dx write their [M, H] output rows scattered to token-slot
order (pointer stores, one row per slot), and a k-slot sum then reads them back as [T, H]. Written
in expert order instead, the same rows can leave through TMA stores, and the GEMM is then eligible
for warp specialisation (A in expert order, a TMA store); the k-slot sum reads each slot's row at
its position in expert order (``slot_sum(..., positions=)``, the routing's inverse permutation).
Same bytes moved either way: what changes is the GEMM's epilogue and the sum's access pattern.

For Qwen3-30B-A3B's shapes at each token count: the shipped config scattered + slot sum (as the
block runs today), then a grid of configs writing expert order + the positioned sum, every output
checked against the scattered one (NaN-poisoned), each part timed (do_bench median, L2 flushed).
Writes ``OUT/unscatter.json``.

    python3 benchmarks/gpu_unscatter_probe.py --out DIR [--tokens 4096 16384]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import probe_args  # noqa: E402

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, TMA_LOAD, TMA_STORE, WARP_SPEC)
GRID = [(128, 256, 64, 8, 3, True, True, False), (128, 256, 64, 8, 4, True, True, False),
        (128, 256, 32, 8, 5, True, True, False), (128, 256, 32, 8, 5, False, True, False),
        (128, 256, 64, 4, 3, True, True, True), (128, 256, 64, 4, 4, True, True, True),
        (128, 256, 32, 4, 4, True, True, True), (64, 256, 64, 4, 4, True, True, True),
        (128, 128, 64, 4, 4, True, True, True)]


def main(argv=None) -> int:
    args, out_dir = probe_args.parse(argv, __doc__.splitlines()[0], [4096, 16384])

    import dataclasses

    import torch

    from moe_tune import models, runtime
    from moe_tune.device import query_device
    from moe_tune.ops import launch
    from moe_tune.ops.routing import build_routing, random_routing
    from moe_tune.ops.rows import slot_sum
    from moe_tune.problem import KernelConfig
    from moe_tune.reference import relative_error

    dev = torch.device("cuda")
    info = query_device(dev)
    shape = models.load_preset(args.model)
    E, H, I, k = shape.E, shape.H, shape.I, shape.topk
    problems = {(p.gemm, p.pass_): p for p in shape.problems()}
    gen = torch.Generator(device=dev).manual_seed(0)
    bf = torch.bfloat16

    def randn(*s, scale=1.0):
        return (torch.randn(*s, generator=gen, device=dev) * scale).to(bf)

    w1, w2 = randn(E, 2 * I, H, scale=0.02), randn(E, H, I, scale=0.02)
    rows, t0 = [], time.time()
    for T in args.tokens:
        M = T * k
        routing = build_routing(random_routing(T, E, k, device=dev, generator=gen), E)
        positions = torch.empty(M, dtype=torch.int32, device=dev)
        positions[routing.sorted_slots.long()] = torch.arange(M, dtype=torch.int32, device=dev)
        weights = torch.softmax(torch.randn(T, k, generator=gen, device=dev), -1).to(bf).reshape(M)
        act = randn(M, I)
        # "down forward, weight in the sum": the GEMM unweighted (so warp specialisation may run
        # it), the routing weight applied by the positioned k-slot sum in float32.
        gemms = {"down forward": (act, w2, False, weights, problems["down", "forward"]),
                 "down forward, weight in the sum": (act, w2, False, weights, problems["down", "forward"]),
                 "up dx": (randn(M, 2 * I), w1, True, None, problems["up", "dx"])}
        for name, (a, w, trans_w, wts, problem) in gemms.items():
            sum_weights = wts if "sum" in name else None
            tuned = runtime.get_config(problem, T, info)

            def gemm(out, cfg, scatter):
                epilogue_weights = wts if scatter or sum_weights is None else None
                launch.grouped_mm(a, w, out, routing, epilogue_weights, trans_w=trans_w, gather_a=False,
                                  gather_div=1, scatter_c=scatter, cfg=cfg, info=info)

            scattered = torch.full((M, H), float("nan"), dtype=bf, device=dev)
            gemm(scattered, tuned, True)
            summed = slot_sum(scattered, k)
            base = dict(T=T, gemm=name, kind="scattered (shipped)", config=tuned.short(),
                        gemm_ms=probe_args.median_ms(lambda: gemm(scattered, tuned, True)),
                        sum_ms=probe_args.median_ms(lambda: slot_sum(scattered, k, summed)))
            base["total_ms"] = base["gemm_ms"] + base["sum_ms"]
            rows.append(base)
            print(f"T={T} {name}: scattered {tuned.short()} gemm {base['gemm_ms']:.4f} + sum {base['sum_ms']:.4f}"
                  f" = {base['total_ms']:.4f} ms", flush=True)
            configs = [dataclasses.replace(tuned, TMA_STORE=False, WARP_SPEC=False),
                       dataclasses.replace(tuned, TMA_STORE=True, WARP_SPEC=False)]
            configs += [KernelConfig(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=nw, num_stages=ns,
                                     TMA_LOAD=ld, TMA_STORE=st, WARP_SPEC=ws)
                        for bm, bn, bk, nw, ns, ld, st, ws in GRID]
            for cfg in dict.fromkeys(configs):
                row = dict(T=T, gemm=name, kind="expert order", config=cfg.short())
                try:
                    ordered = torch.full((M, H), float("nan"), dtype=bf, device=dev)
                    gemm(ordered, cfg, False)
                    out = slot_sum(ordered, k, positions=positions, weights=sum_weights)
                    row["err"] = relative_error(out, summed)
                    if not row["err"] < 1e-2:
                        raise RuntimeError(f"error {row['err']:.2e} against the scattered path")
                    row["gemm_ms"] = probe_args.median_ms(lambda: gemm(ordered, cfg, False))
                    row["sum_ms"] = probe_args.median_ms(
                        lambda: slot_sum(ordered, k, out, positions=positions, weights=sum_weights))
                    row["total_ms"] = row["gemm_ms"] + row["sum_ms"]
                    row["vs_shipped"] = base["total_ms"] / row["total_ms"]
                    print(f"  {cfg.short():40s} gemm {row['gemm_ms']:.4f} + sum {row['sum_ms']:.4f} = "
                          f"{row['total_ms']:.4f} ms ({row['vs_shipped']:.3f}x)  t={time.time() - t0:.0f}s", flush=True)
                except Exception as exc:  # a failing config is a row, not the end of the probe
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                    print(f"  {cfg.short():40s} {row['error']}", flush=True)
                rows.append(row)
                (out_dir / "unscatter.json").write_text(json.dumps(dict(device=info.name, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
