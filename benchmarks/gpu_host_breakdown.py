"""Where the graphed eager block's host time goes, at the bench's host-section size.

Builds the bench's Qwen3-MoE experts block (``moe_tune.bench.block``) at ``--tokens`` tokens, runs
moe-tune eager with CUDA graphs on (captured on the second call), then:

* host ms per fwd+bwd as ``moe-tune bench`` reads it (``moe_tune.bench.host._loop_ms``), and the
  same split into forward alone and backward alone;
* the Python profile (cProfile, by own time) of 30 fwd+bwd calls;
* torch.profiler's CPU-side table of the same calls (self CPU time per op).

    python3 benchmarks/gpu_host_breakdown.py --out DIR [--model qwen3-30b-a3b] [--tokens 128]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import probe_args  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="qwen3-30b-a3b")
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args(argv)

    import torch

    from moe_tune import models
    from moe_tune.bench.block import block_inputs, build_block
    from moe_tune.bench.host import _loop_ms
    from moe_tune.ops import graphs

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shape = models.load_preset(args.model)
    block = build_block(shape, "bfloat16", "cuda")
    inputs = block_inputs(block, shape, args.tokens, "bfloat16", "cuda")
    report = {}
    for label, graphed in (("eager", False), ("graphed", True)):
        graphs.enable(graphed)
        graphs.reset()
        prepared, call = probe_args.warmed_block_call(block, "moe_tune", inputs, warm=1)
        host = sorted(_loop_ms(call, 20, "cuda")[0] for _ in range(9))
        fwd_ms, bwd_ms = [], []
        for _ in range(9):  # one forward then its backward: a graph pair is leased from one to the other
            inputs.clear()
            torch.cuda.synchronize()
            fwd_s = bwd_s = 0.0
            for _ in range(10):
                t0 = time.perf_counter()
                out = prepared.fwd()
                t1 = time.perf_counter()
                out.backward(inputs.grad)
                t2 = time.perf_counter()
                inputs.clear()
                fwd_s, bwd_s = fwd_s + t1 - t0, bwd_s + t2 - t1
            torch.cuda.synchronize()
            fwd_ms.append(fwd_s * 100)
            bwd_ms.append(bwd_s * 100)
        report[label] = dict(host=host, median=statistics.median(host), forward=statistics.median(fwd_ms),
                             backward=statistics.median(bwd_ms))
        print(label, json.dumps(report[label]), flush=True)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(30):
            call()
        prof.disable()
        torch.cuda.synchronize()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(45)
        (out / f"cprofile_{label}.txt").write_text(text.getvalue())
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as tp:
            for _ in range(30):
                call()
            torch.cuda.synchronize()
        (out / f"torchprof_{label}.txt").write_text(tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
    graphs.enable(False)
    (out / "host_breakdown.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
