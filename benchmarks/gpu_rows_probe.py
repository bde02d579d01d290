"""The row kernels (``moe_tune.ops.rows``) against the torch ops they replace, on one GPU.

For each token count at a model's shape: the k-slot sum of an [M, H] slot-ordered buffer
(``torch.sum`` over the slot axis vs ``slot_sum``) and the copy of [T, H] token rows to expert
order (``index_select`` vs ``gather_rows``), each kernel at several tiles; do_bench medians, the
bytes each must move over its time, and a check against the torch result (the gather exactly,
the sum within one bf16 rounding). Writes ``OUT/rows_probe.json`` and prints a table.

    python3 benchmarks/gpu_rows_probe.py --out DIR [--model qwen3-30b-a3b] [--tokens 4096 16384]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import probe_args  # noqa: E402

TILES = [(2048, 512, 4), (4096, 512, 4), (4096, 1024, 8), (8192, 1024, 8), (1024, 256, 4), (4096, 2048, 8)]


def main(argv=None) -> int:
    args, out_dir = probe_args.parse(argv, __doc__.splitlines()[0], [4096, 16384])

    import torch

    from moe_tune import models
    from moe_tune.ops import rows as ops_rows
    from moe_tune.ops.routing import build_routing

    shape = models.load_preset(args.model)
    H, k, E = shape.H, shape.topk, shape.E
    results = []

    def bench(fn):
        return probe_args.median_ms(fn, rep=100)

    for T in args.tokens:
        M = T * k
        slot_rows = torch.randn(M, H, device="cuda", dtype=torch.bfloat16)
        tokens = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
        ids = torch.randn(T, E, device="cuda").topk(k, dim=1).indices
        slots = build_routing(ids, E).sorted_slots
        sum_bytes = (M + T) * H * 2
        copy_bytes = 2 * M * H * 2  # each row read once per slot (mostly from L2) and written once
        ref_sum = slot_rows.view(T, k, H).sum(1)
        ref_copy = tokens.index_select(0, slots // k)
        ms = bench(lambda: slot_rows.view(T, k, H).sum(1))
        results.append(dict(T=T, op="sum", impl="torch", ms=ms, tbps=sum_bytes / ms / 1e9))
        ms = bench(lambda: tokens.index_select(0, slots // k))
        results.append(dict(T=T, op="copy", impl="torch", ms=ms, tbps=copy_bytes / ms / 1e9))
        for tile in TILES:
            out = torch.full((T, H), float("nan"), device="cuda", dtype=torch.bfloat16)
            ops_rows.slot_sum(slot_rows, k, out, tile=tile)
            diff = ((out.float() - ref_sum.float()).abs() / ref_sum.float().abs().clamp_min(1e-3)).max().item()
            ms = bench(lambda: ops_rows.slot_sum(slot_rows, k, out, tile=tile))
            results.append(dict(T=T, op="sum", impl=f"slot_sum {tile}", ms=ms, tbps=sum_bytes / ms / 1e9,
                                max_rel_diff=diff))
            dst = torch.full((M, H), float("nan"), device="cuda", dtype=torch.bfloat16)
            ops_rows.gather_rows(tokens, slots, k, dst, tile=tile)
            same = torch.equal(dst, ref_copy)
            ms = bench(lambda: ops_rows.gather_rows(tokens, slots, k, dst, tile=tile))
            results.append(dict(T=T, op="copy", impl=f"gather_rows {tile}", ms=ms, tbps=copy_bytes / ms / 1e9,
                                exact=same))
        for r in results:
            if r["T"] == T:
                check = (f" max rel diff {r['max_rel_diff']:.1e}" if "max_rel_diff" in r
                         else f" exact {r['exact']}" if "exact" in r else "")
                print(f"T={T} {r['op']:4} {r['impl']:28} {r['ms'] * 1e3:7.1f} us {r['tbps']:5.2f} TB/s{check}", flush=True)
    (out_dir / "rows_probe.json").write_text(json.dumps(dict(device=torch.cuda.get_device_name(), rows=results), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
