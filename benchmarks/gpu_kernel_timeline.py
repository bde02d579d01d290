"""The experts block's kernels one by one: GPU time of each launch of one fwd+bwd, in launch order.

For each preset (its own layout: the Qwen3-MoE block or gpt-oss's) and token count: the block's
forward and backward on random inputs, warmed, then profiled over ``--iters`` calls
(torch.profiler, CUDA activity); each launch's GPU time is averaged over the calls, by its position
in the call. Says where a block's time goes beyond its GEMMs. Then the same fwd+bwd timed as the
bench times it (do_bench median, L2 flushed), with the SM clock and power sampled meanwhile
(``nvidia-smi``), to compare the two. Writes ``OUT/timeline.json``.

    python3 benchmarks/gpu_kernel_timeline.py --out DIR [--presets qwen3-30b-a3b gpt-oss-20b] [--tokens 4096 16384]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def block_call(shape, T: int, dev: str = "cuda"):
    """A fwd+bwd of ``shape``'s block at ``T`` tokens, gradients cleared each call."""
    import torch

    from moe_tune import moe_experts
    from moe_tune.ops.gptoss import gptoss_experts
    from moe_tune.ops.routing import random_routing

    bf = torch.bfloat16 if dev == "cuda" else torch.float32
    gen = torch.Generator(device=dev).manual_seed(T)
    E, H, I, k = shape.E, shape.H, shape.I, shape.topk

    def param(*s, scale=0.02):
        return (torch.randn(*s, generator=gen, device=dev) * scale).to(bf).requires_grad_()

    x = param(T, H, scale=1.0)
    idx = random_routing(T, E, k, device=dev, generator=gen)
    w = torch.softmax(torch.randn(T, k, generator=gen, device=dev), -1).to(bf).requires_grad_()
    grad = torch.randn(T, H, generator=gen, device=dev).to(bf)
    if shape.layout == "gpt_oss":
        leaves = [x, w, param(E, H, 2 * I), param(E, 2 * I), param(E, I, H), param(E, H)]

        def run():
            return gptoss_experts(x, leaves[2], leaves[3], leaves[4], leaves[5], idx, w, limit=7.0, alpha=1.702)
    else:
        leaves = [x, w, param(E, 2 * I, H), param(E, H, I)]

        def run():
            return moe_experts(x, leaves[2], leaves[3], idx, w)

    def call():
        for t in leaves:
            t.grad = None
        run().backward(grad)

    return call


def timeline(call, iters: int) -> list[dict]:
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            call()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    kernels.sort(key=lambda e: e.time_range.start)
    per_call = len(kernels) // iters
    rows = []
    for i in range(per_call):
        same = [kernels[c * per_call + i] for c in range(iters)]
        rows.append(dict(name=same[0].name[:80], us=sum(e.time_range.elapsed_us() for e in same) / iters))
    return rows


def timed_with_clocks(call) -> dict:
    """do_bench median of ``call``, and the SM clocks (MHz) and power (W) nvidia-smi read meanwhile."""
    import subprocess

    import triton

    smi = subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
                            "-lms", "50"], stdout=subprocess.PIPE, text=True)
    try:
        ms = triton.testing.do_bench(call, warmup=25, rep=300, return_mode="median")
    finally:
        smi.terminate()
    readings = [line.split(",") for line in smi.communicate()[0].splitlines() if "," in line]
    clocks = [float(r[0]) for r in readings if r[0].strip().replace(".", "").isdigit()]
    power = [float(r[1]) for r in readings if r[1].strip().replace(".", "").isdigit()]
    return dict(bench_ms=ms, sm_mhz=sorted(clocks)[len(clocks) // 2] if clocks else None,
                sm_mhz_min=min(clocks) if clocks else None, power_w=max(power) if power else None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--presets", nargs="+", default=["qwen3-30b-a3b", "gpt-oss-20b"])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    import torch

    from moe_tune import models

    results = dict(device=torch.cuda.get_device_name(), runs=[])
    for preset in args.presets:
        shape = models.load_preset(preset)
        for T in args.tokens:
            call = block_call(shape, T)
            rows = timeline(call, args.iters)
            total = sum(r["us"] for r in rows)
            timed = timed_with_clocks(call)
            results["runs"].append(dict(preset=preset, T=T, total_us=total, kernels=rows, **timed))
            print(f"{preset} T={T}: {len(rows)} launches, {total:.0f} us of GPU time; timed {timed}", flush=True)
            for r in rows:
                print(f"  {r['us']:8.1f}  {r['name']}", flush=True)
            (out_dir / "timeline.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
