"""gpt-oss's fused row copies against separate ones.

Until the fourteenth session gpt-oss's up forward and down dx gathered their A rows and also wrote
them to expert order (fusion "sort", ``SORT_A``) for the two dW, which then stream both operands
through TMA. The Qwen-layout block does the other thing: plain gathered GEMMs, and a separate row
copy (``gather_rows``) just before each dW. A kernel timeline (H200, gpt-oss-20b × 16384) read the
fused up forward at 4.0 ms against the up dx's 3.1 for the same FLOPs. Here, per preset and token
count: the fused GEMM ("sort") and the same GEMM unfused, both with the unfused problem's config
(cache or heuristic default; the fused problem has no cache entry of its own any more), and the
separate row copy of the same rows. Every launch is gated against the float32 reference on a
NaN-poisoned output. Writes ``OUT/gptoss_sort.json``. (Its first run, before the block changed, timed the fused GEMMs
with their shipped entries: BENCHMARKS.md.)

    python3 benchmarks/gpu_gptoss_sort_probe.py --out DIR [--presets gpt-oss-20b gpt-oss-120b] [--tokens 4096 16384]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import probe_args  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--presets", nargs="+", default=["gpt-oss-20b", "gpt-oss-120b"])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    args = ap.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    import torch

    from moe_tune import models, runtime
    from moe_tune.device import query_device
    from moe_tune.ops.rows import gather_rows
    from moe_tune.tuning.cases import Case
    from moe_tune.tuning.routing_spec import RoutingSpec

    info = query_device(torch.device("cuda"))
    rows = []
    for preset in args.presets:
        shape = models.load_preset(preset)
        for T in args.tokens:
            for plain in (p for p in shape.problems() if (p.gemm, p.pass_) in (("up", "forward"), ("down", "dx"))):
                fused = dataclasses.replace(plain, fusion="sort")
                cfg = runtime.explain(plain, T, info)  # the fused problem has no cache entry any more
                result = dict(preset=preset, T=T, problem=fused.key, config=cfg.config.short(), source=cfg.source)
                result["fused"] = probe_args.time_config(Case(fused, T, RoutingSpec(), 0, "cuda"), cfg.config)
                plain_case = Case(plain, T, RoutingSpec(), 0, "cuda")
                result["plain"] = probe_args.time_config(plain_case, cfg.config)
                width = fused.K if fused.pass_ == "forward" else fused.N
                tokens_rows = torch.randn(T, width, device="cuda").to(torch.bfloat16)
                copy = torch.empty(T * fused.topk, width, device="cuda", dtype=torch.bfloat16)
                slots = plain_case.routing.sorted_slots
                result["copy_ms"] = probe_args.median_ms(lambda: gather_rows(tokens_rows, slots, fused.topk, copy))
                rows.append(result)
                fused_ms, plain_ms = (result[k].get("ms", float("nan")) for k in ("fused", "plain"))
                print(f"{preset} T={T} {fused.gemm} {fused.pass_} ({cfg.config.short()} [{cfg.source}]): fused "
                      f"{fused_ms:.4f}, plain {plain_ms:.4f} + copy {result['copy_ms']:.4f} = "
                      f"{plain_ms + result['copy_ms']:.4f}", flush=True)
                for k in ("fused", "plain"):
                    if "error" in result[k]:
                        print(f"   {k}: {result[k]['error']}", flush=True)
                (out_dir / "gptoss_sort.json").write_text(json.dumps(dict(device=info.name, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
