"""gpt-oss's activation backward (``gptoss_bwd_kernel``: dH, w·A, both bias gradients and the
routing-weight partials in one launch) over tiles, warps and row-loop pipelining, on one GPU.

Each program walks every row of one expert for one column block, so the kernel is a chain of
dependent loads per step (the rows' slots, then their routing weights) repeated over the expert's
rows. ``STAGES`` ≥ 2 lets Triton's software pipeline fetch those indices steps ahead, and with
descriptors (``TMA``) the dA and H tiles too, into shared memory. Every
variant's outputs are compared with the shipped variant's, and each is timed with
``triton.testing.do_bench`` (median), beside a device copy of the same bytes (the memory roof).
Writes ``OUT/gptoss_bwd_probe.json``.

    python3 benchmarks/gpu_gptoss_bwd_probe.py --out DIR [--tokens 4096 16384] [--pairs]

``--pairs`` times the 16-bit H and dH read and written as int32 words of (gate, up) pairs
(``BWD_PACKED``, one tile layout a step) against the interleaved slabs split in registers, over
fewer tiles (``PAIR_TILES``) and descriptors only. ``--stores`` (pair words, descriptor loads) times
the tiles of ``STORE_TILES`` × ``STORE_STAGES``. (In the session that chose 16-row steps it also
compared dH and w·A written through descriptors, and the bias gradients summed over each step's
rows; both lost at the best tiles and left the kernel: BENCHMARKS.md, sixteenth session.)
``--split`` also times the activation's programs alone (no down-bias programs: db2 and the
routing-weight gradient not wanted), to show each half's share. ``--db2`` keeps the activation's tile
and times the down-bias programs' own tiles (``BWD_DB2_BLOCK_M`` × ``BWD_DB2_BLOCK_N``, ``DB2_TILES``).
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

SHAPES = {"gpt-oss-20b": (32, 2880, 2880, 4), "gpt-oss-120b": (128, 2880, 2880, 4)}
TILES = ((32, 64, 4), (16, 64, 4), (64, 64, 4), (64, 64, 8), (32, 128, 4), (64, 32, 4), (16, 128, 4))
STAGES = (1, 2, 3, 4)
DESCRIPTORS = (False, True)
PAIR_TILES = ((64, 64, 4), (32, 64, 4), (64, 128, 4), (64, 128, 8), (128, 64, 8), (32, 128, 4))
PAIR_STAGES = (2, 3, 4)
STORE_TILES = ((32, 64, 4), (16, 64, 4), (16, 64, 2), (8, 64, 4), (8, 64, 2), (16, 32, 4), (16, 128, 4))
STORE_STAGES = (3, 4, 5)
DB2_TILES = ((16, 64), (32, 64), (64, 64), (128, 64), (32, 128), (64, 128), (16, 256), (32, 256))
# A variant: (BLOCK_M, BLOCK_N, warps, stages, descriptor loads, pair words, down-bias rows, columns)
KNOBS = ("BWD_BLOCK_M", "BWD_BLOCK_N", "BWD_WARPS", "BWD_STAGES", "BWD_TMA", "BWD_PACKED", "BWD_DB2_BLOCK_M",
         "BWD_DB2_BLOCK_N")


def main(argv=None) -> int:
    args, out_dir = probe_args.parse(argv, __doc__.splitlines()[0], [4096, 16384],
                                     flags=("--pairs", "--stores", "--split", "--db2"))
    pairs = args.pairs

    import torch

    from moe_tune.ops import gptoss
    from moe_tune.ops.routing import build_routing
    from moe_tune.reference import relative_error

    shipped = tuple(getattr(gptoss, knob) for knob in KNOBS)
    rows, t0 = [], time.time()
    dt = torch.bfloat16
    for (name, (E, H, I, k)), T in itertools.product(SHAPES.items(), args.tokens):
        M = T * k
        gen = torch.Generator(device="cuda").manual_seed(T + E)
        ids = torch.stack([torch.randperm(E, generator=gen, device="cuda")[:k] for _ in range(T)])
        routing = build_routing(ids, E)
        weights = torch.rand(T, k, generator=gen, device="cuda").to(dt)
        d_act = torch.randn(M, I, generator=gen, device="cuda").to(dt)
        h = (3 * torch.randn(M, 2 * I, generator=gen, device="cuda")).to(dt)  # some values past the clamps
        b1 = torch.randn(E, 2 * I, generator=gen, device="cuda").to(dt)
        g = torch.randn(T, H, generator=gen, device="cuda").to(dt)
        b2 = torch.randn(E, H, generator=gen, device="cuda").to(dt)

        def run():
            return gptoss.activation_backward(d_act, h, b1, g, b2, weights, routing.expert_offsets,
                                              routing.sorted_slots, limit=7.0, alpha=1.702, need_down_b=True,
                                              need_weights=True, in_op=False)

        def run_act():
            return gptoss.activation_backward(d_act, h, b1, g, b2, weights, routing.expert_offsets,
                                              routing.sorted_slots, limit=7.0, alpha=1.702, need_down_b=False,
                                              need_weights=False, in_op=False)

        moved = 2 * (d_act.numel() + 2 * h.numel() + d_act.numel() + M * H)  # dA, H read; dH, w·A written; G read
        src = torch.empty(moved // 4, dtype=torch.int16, device="cuda")
        roof_ms = probe_args.median_ms(lambda: src.clone())  # reads half the bytes, writes half
        ref = None
        if args.db2:
            grid = [shipped[:6] + tile for tile in DB2_TILES]
        elif args.stores:
            grid = [(bm, bn, w, st, True, True) + shipped[6:] for (bm, bn, w), st
                    in itertools.product(STORE_TILES, STORE_STAGES)]
        elif pairs:
            grid = [(bm, bn, w, st, True, pk) + shipped[6:] for (bm, bn, w), st, pk
                    in itertools.product(PAIR_TILES, PAIR_STAGES, (True, False))]
        else:
            grid = [(bm, bn, w, st, tma, shipped[5]) + shipped[6:] for (bm, bn, w), st, tma
                    in itertools.product(TILES, STAGES, DESCRIPTORS)]
        variants = [shipped] + [v for v in grid if v != shipped]
        for variant in variants:
            for knob, value in zip(KNOBS, variant):
                setattr(gptoss, knob, value)
            bm, bn, w, st, tma, pk, dbm, dbn = variant
            row = dict(model=name, T=T, BLOCK_M=bm, BLOCK_N=bn, warps=w, stages=st, descriptors=tma, pairs=pk,
                       DB2_BLOCK_M=dbm, DB2_BLOCK_N=dbn, shipped=variant == shipped, roof_ms=roof_ms)
            try:
                out = [t.float() for t in run()]
                if ref is None:
                    ref = out
                errs = [relative_error(a, b) for a, b in zip(out, ref)]
                if not max(errs) < 2e-2:
                    raise RuntimeError(f"outputs differ from the shipped variant's: {errs}")
                row.update(ms=probe_args.median_ms(run), err=max(errs))
                if args.split:
                    row["act_only_ms"] = probe_args.median_ms(run_act)
            except Exception as exc:  # a variant that fails is a row
                row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            rows.append(row)
            print(f"{name} T={T} {bm}x{bn} w{w} s{st} {'tma' if tma else 'ptr'}{' pairs' if pk else ''} "
                  f"db2 {dbm}x{dbn}: "
                  + (f"{row['ms']:.4f} ms (roof {roof_ms:.4f})" + (f", activation alone {row['act_only_ms']:.4f}"
                                                                  if "act_only_ms" in row else "")
                  if "ms" in row else row["error"]) + f"  t={time.time() - t0:.0f}s", flush=True)
            (out_dir / "gptoss_bwd_probe.json").write_text(json.dumps(rows, indent=1))
        for knob, value in zip(KNOBS, shipped):
            setattr(gptoss, knob, value)
    return 0


if __name__ == "__main__":
    sys.exit(main())
