"""The routing build on one GPU: the counting-sort kernel at several chunk sizes and warp counts
against the sort path (``torch.sort`` + ``searchsorted``), per token count, checked equal to the
sort path's result. Writes ``OUT/routing_probe.json`` and prints a table.

    python3 benchmarks/gpu_routing_probe.py --out DIR [--experts 128] [--topk 8] [--tokens 128 1024 4096 8192 16384]
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
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--tokens", type=int, nargs="+", default=[128, 1024, 4096, 8192, 16384])
    args = ap.parse_args(argv)

    import torch
    import triton

    from moe_tune.kernels.routing import routing_kernel
    from moe_tune.ops.routing import build_routing, random_routing

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    E, k = args.experts, args.topk
    results = []

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")

    for T in args.tokens:
        index = random_routing(T, E, k, device="cuda")
        ref = build_routing(index, E, method="sort")
        ms = bench(lambda: build_routing(index, E, method="sort"))
        results.append(dict(T=T, way="sort", ms=ms))
        ids = index.reshape(-1)
        M = ids.numel()
        for block in (1024, 2048, 4096, 8192, 16384):
            for warps in (4, 8, 16):
                if block > 2 * max(M, 1024):
                    continue
                offsets = torch.full((E + 1,), -1, dtype=torch.int32, device="cuda")
                slots = torch.full((M,), -1, dtype=torch.int32, device="cuda")

                def run():
                    routing_kernel[(E + 1,)](ids, offsets, slots, M, BLOCK=block, num_warps=warps)

                run()
                same = torch.equal(offsets, ref.expert_offsets) and torch.equal(slots, ref.sorted_slots)
                results.append(dict(T=T, way=f"kernel BLOCK={block} w{warps}", ms=bench(run), same=same))
        for r in results:
            if r["T"] == T:
                print(f"T={T} {r['way']:28} {r['ms'] * 1e3:8.1f} us" + (f" same {r['same']}" if "same" in r else ""),
                      flush=True)
    (out_dir / "routing_probe.json").write_text(json.dumps(dict(device=torch.cuda.get_device_name(), rows=results),
                                                           indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
