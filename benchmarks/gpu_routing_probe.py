"""The routing build on one GPU: the per-expert counting-sort kernel, the chunked one at several
chunk sizes and warp counts, and the sort path (``torch.sort`` + ``searchsorted``), per (experts,
top-k) and token count, each checked equal to the sort path's result. GPU time from CUDA-graph
replays (``triton.testing.do_bench_cudagraph``): at these sizes a plain loop would time the host's
launches. Writes ``OUT/routing_probe.json`` and prints a table.

    python3 benchmarks/gpu_routing_probe.py --out DIR [--shapes 128:8 512:10] [--tokens 128 1024 4096 16384]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", nargs="+", default=["128:8", "512:10", "64:6", "32:4"], help="experts:top-k")
    ap.add_argument("--tokens", type=int, nargs="+", default=[128, 512, 1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--chunk-sizes", type=int, nargs="*", default=[256, 512, 1024, 2048],
                    help="chunked variants to time beside the defaults (none: the defaults only)")
    args = ap.parse_args(argv)

    import torch
    import triton

    from moe_tune.kernels.routing import routing_count_kernel, routing_place_kernel
    from moe_tune.ops.launch import cdiv, next_power_of_2
    from moe_tune.ops.routing import build_routing, random_routing

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []

    def bench(fn):
        fn()
        torch.cuda.synchronize()
        return triton.testing.do_bench_cudagraph(fn, rep=30, return_mode="median")

    for shape in args.shapes:
        E, k = (int(v) for v in shape.split(":"))
        for T in args.tokens:
            index = random_routing(T, E, k, device="cuda")
            ref = build_routing(index, E, method="sort")
            ids = index.reshape(-1)
            M = ids.numel()
            for method in ("sort", "kernel", "chunks"):
                if method == "kernel" and M * E > 1 << 26:
                    continue
                r = build_routing(index, E, method=method)
                same = (torch.equal(r.expert_offsets, ref.expert_offsets)
                        and torch.equal(r.sorted_slots, ref.sorted_slots))
                results.append(dict(E=E, k=k, T=T, way=method, ms=bench(lambda: build_routing(index, E, method=method)),
                                    same=same))
            e_pow2 = next_power_of_2(E)
            for chunk in args.chunk_sizes:  # (a sort of 4096 ids took ~80 µs, of 8192 ~170)
                if chunk > 2 * max(M, 1024):
                    continue
                for warps in (4, 8):
                    chunks = cdiv(M, chunk)
                    scratch = torch.empty((2, chunks, e_pow2), dtype=torch.int32, device="cuda")
                    offsets = torch.full((E + 1,), -1, dtype=torch.int32, device="cuda")
                    slots = torch.full((M,), -1, dtype=torch.int32, device="cuda")

                    def run():
                        routing_count_kernel[(chunks,)](ids, scratch[0], M, E, E_POW2=e_pow2, CHUNK=chunk, num_warps=4)
                        routing_place_kernel[(chunks,)](ids, scratch[0], scratch[1], offsets, slots, M, chunks, E,
                                                        E_POW2=e_pow2, CHUNK=chunk,
                                                        COUNT_ROWS=max(1, 4096 // e_pow2), num_warps=warps)

                    try:
                        run()
                        same = torch.equal(offsets, ref.expert_offsets) and torch.equal(slots, ref.sorted_slots)
                        results.append(dict(E=E, k=k, T=T, way=f"chunks CHUNK={chunk} w{warps}", ms=bench(run),
                                            same=same))
                    except Exception as exc:  # a variant that does not compile is a row, not the end
                        results.append(dict(E=E, k=k, T=T, way=f"chunks CHUNK={chunk} w{warps}",
                                            error=f"{type(exc).__name__}: {exc}"[:200]))
            for r in results:
                if r["E"] == E and r["T"] == T:
                    print(f"E={E:4d} k={k:2d} T={T:6d} {r['way']:28s} "
                          + (f"{r['ms'] * 1e3:8.1f} us same={r['same']}" if "ms" in r else r["error"]), flush=True)
    (out_dir / "routing_probe.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
