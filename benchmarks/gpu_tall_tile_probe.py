"""256-row tiles for the forward and dx GEMMs, against the tuned config, on one GPU.

The `default` sweep space stops at BLOCK_M = 128. Where an expert has about 128 routed rows
(gpt-oss-120b at 4096 tokens: 128 experts, k = 4) the GEMMs are bound by weight traffic, and
every expert with more than 128 rows (about half of them) costs a second row tile that reads its
whole weight slice again for a handful of rows. One 256-row tile covers them all. For each
forward/dx problem: the runtime's config, then BLOCK_M = 256 configs (each gated against the
float32 reference on a NaN-poisoned output), timed with ``triton.testing.do_bench`` (median).
Writes ``OUT/tall_tile_probe.json``.

    python3 benchmarks/gpu_tall_tile_probe.py --out DIR [--model gpt-oss-120b] [--tokens 4096]
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


def tall(tuned):
    for bn, bk, st in itertools.product((64, 128), (64, 32), (3, 4)):
        yield dataclasses.replace(tuned, BLOCK_M=256, BLOCK_N=bn, BLOCK_K=bk, num_stages=st, num_warps=8,
                                  WARP_SPEC=False)


def main(argv=None) -> int:
    args, out_dir = probe_args.parse(argv, __doc__.splitlines()[0], [4096])

    import torch

    from moe_tune import models, runtime
    from moe_tune.device import query_device
    from moe_tune.space import why_illegal
    from moe_tune.tuning.cases import Case
    from moe_tune.tuning.routing_spec import RoutingSpec

    info = query_device(torch.device("cuda"))
    shape = models.load_preset(args.model)
    rows, t0 = [], time.time()
    for T in args.tokens:
        for p in shape.problems():
            if p.pass_ == "dw":
                continue
            case = Case(p, T, RoutingSpec(), 0, "cuda")
            tuned = runtime.get_config(p, T, info)
            best = None
            base = None
            for label, cfg in [("tuned", tuned)] + [("tall", c) for c in tall(tuned)]:
                if why_illegal(p, cfg, info) is not None:
                    continue
                row = dict(T=T, problem=p.key, kind=label, config=cfg.short(), **probe_args.time_config(case, cfg))
                rows.append(row)
                if "ms" in row:
                    if label == "tuned":
                        base = row
                    elif best is None or row["ms"] < best["ms"]:
                        best = row
            ratio = base["ms"] / best["ms"] if base and best else float("nan")
            show = lambda r: f"{r['ms']:.4f} ms ({r['config']})" if r else "-"  # noqa: E731
            print(f"{args.model} T={T} {p.key}: tuned {show(base)}, 256-row best {show(best)} = {ratio:.3f}x"
                  f"  t={time.time() - t0:.0f}s", flush=True)
            (out_dir / "tall_tile_probe.json").write_text(json.dumps(dict(device=info.name, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
