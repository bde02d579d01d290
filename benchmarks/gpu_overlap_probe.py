"""The backward's row copies beside the down dx GEMM (``block.OVERLAP_ROW_COPIES``), on and off.

For each token count: transformers' Qwen3-MoE experts on moe-tune, eager and compiled as
``moe-tune bench`` runs them, fwd+bwd timed with the copies on the side stream and in order, in
alternating rounds (do_bench medians); gradients of the two ways compared (the same kernels: they
must agree exactly); peak memory of each; and one profiled backward's kernel timeline (start and
end of the down dx GEMM and of each copy, µs from the backward's first kernel), which shows
whether the copies ran beside the GEMM. Writes ``OUT/overlap_probe.json``, prints a table.

    python3 benchmarks/gpu_overlap_probe.py --out DIR [--model qwen3-30b-a3b] [--tokens 4096 16384]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def timeline(fn) -> list[dict]:
    """Kernels of one ``fn()`` call: name, start and end in µs from the first kernel."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA" and e.name and "Memcpy" not in e.name]
    if not kernels:
        return []
    t0 = min(e.time_range.start for e in kernels)
    return sorted(({"name": e.name[:60], "start": e.time_range.start - t0, "end": e.time_range.end - t0}
                   for e in kernels), key=lambda r: r["start"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="qwen3-30b-a3b")
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args(argv)

    import torch

    from moe_tune import models
    from moe_tune.bench import block as bench_block
    from moe_tune.bench.isolation import peak_memory_mib, peak_memory_reset
    from moe_tune.bench.timing import do_bench_timer
    from moe_tune.ops import block as ops_block

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    shape = models.load_preset(args.model)
    timer = do_bench_timer(rep_ms=200)
    block = bench_block.build_block(shape, "bfloat16", "cuda")
    rows = []
    t_start = time.time()
    try:
        for T in args.tokens:
            inputs = bench_block.block_inputs(block, shape, T, "bfloat16", "cuda")
            grads = list(inputs.leaves.values())
            for label in ("moe_tune", "moe_tune+compile"):
                prepared = bench_block.prepare(block, label, inputs)
                results, peaks = {}, {}
                for overlap in (False, True):
                    ops_block.OVERLAP_ROW_COPIES = overlap
                    inputs.clear()
                    base = peak_memory_reset("cuda")
                    prepared.fwd_bwd()
                    peaks[overlap] = peak_memory_mib("cuda", base)
                    results[overlap] = {n: t.grad.clone() for n, t in inputs.leaves.items()}
                    inputs.clear()
                same = all(torch.equal(results[False][n], results[True][n]) for n in results[False])
                times = {False: [], True: []}
                for _ in range(args.rounds):
                    for overlap in (False, True):
                        ops_block.OVERLAP_ROW_COPIES = overlap
                        times[overlap].append(timer(prepared.fwd_bwd, grad_to_none=grads).ms)
                        inputs.clear()
                ops_block.OVERLAP_ROW_COPIES = True
                med = {o: sorted(v)[len(v) // 2] for o, v in times.items()}
                kernels = timeline(prepared.fwd_bwd) if label == "moe_tune" else []
                inputs.clear()
                rows.append(dict(T=T, implementation=label, times_ms={str(o): v for o, v in times.items()},
                                 median_ms={str(o): m for o, m in med.items()},
                                 peak_mib={str(o): p for o, p in peaks.items()}, grads_identical=same,
                                 kernels=kernels))
                print(f"T={T} {label}: fwd+bwd in order {med[False]:.3f} ms, copies beside {med[True]:.3f} ms "
                      f"({med[False] / med[True]:.3f}x); peak {peaks[False]:.0f} / {peaks[True]:.0f} MiB; "
                      f"grads identical {same}  t={time.time() - t_start:.0f}s", flush=True)
                for k in kernels:
                    if any(s in k["name"] for s in ("grouped_mm_kernel", "index", "swiglu_backward", "dw_kernel")):
                        print(f"    {k['start']:9.1f} {k['end']:9.1f}  {k['name']}")
                del prepared
            del inputs
            torch.cuda.empty_cache()
    finally:
        (out_dir / "overlap_probe.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
