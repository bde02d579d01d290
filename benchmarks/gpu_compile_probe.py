"""GPU probe: moe-tune's experts block eager against torch.compile.

    PYTHONPATH=. python3 benchmarks/gpu_compile_probe.py --out $OUT

Times fwd and fwd+bwd of both (``gpu_block_probe.time_block``), then prints the block's GPU
kernels eager and compiled (torch.profiler, per call) at the largest token count, so a gap between
the two reads kernel by kernel, and any warning torch logged. Writes ``compile_probe.json`` under
``--out``. (It found the 0.9 ms that Inductor's own gathers and sums cost when the ops were
``triton_op``s, H100, 16384 tokens; see ``moe_tune.ops.launch``.)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpu_block_probe import SHAPES, moe_tune_case, time_block  # noqa: E402


def kernel_table(shape, T: int, compiled: bool, calls: int = 5) -> list[tuple[str, int, float]]:
    """(kernel name, launches per call, GPU ms per call) of one moe-tune fwd+bwd, longest first."""
    from torch.profiler import ProfilerActivity, profile

    torch._dynamo.reset()
    blk, experts, x, idx, w, grad, leaves = moe_tune_case(shape, T)
    module = torch.compile(experts, fullgraph=True) if compiled else experts
    for _ in range(3):
        module(x, idx, w).backward(grad)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            for t in leaves:
                t.grad = None
            module(x, idx, w).backward(grad)
        torch.cuda.synchronize()
    rows = {}
    for e in prof.events():
        if e.device_type.name != "CUDA":
            continue
        n, us = rows.get(e.name, (0, 0.0))
        rows[e.name] = (n + 1, us + e.device_time)
    table = sorted(((name[:90], n // calls, us / calls / 1e3) for name, (n, us) in rows.items()), key=lambda r: -r[2])
    del blk, experts, module
    torch.cuda.empty_cache()
    return table


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    warnings = []

    class Keep(logging.Handler):
        def emit(self, record):
            warnings.append(f"{record.name}: {record.getMessage()}"[:300])

    logging.getLogger("torch").addHandler(Keep(level=logging.WARNING))
    results = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d")}
    print(results, flush=True)
    qwen = SHAPES["qwen3-30b-a3b"]
    for T in args.tokens:
        time_block(qwen, T, results, "qwen3-30b-a3b", ("moe_tune", "moe_tune+compile"))
    T = max(args.tokens)
    for compiled in (False, True):
        table = kernel_table(qwen, T, compiled)
        results[f"kernels/T{T}/{'compiled' if compiled else 'eager'}"] = table
        print(f"\nkernels, T={T}, {'compiled' if compiled else 'eager'}: "
              f"{sum(r[2] for r in table):.3f} ms GPU per fwd+bwd", flush=True)
        for name, n, ms in table[:16]:
            print(f"  {ms:8.3f} ms  x{n:<3} {name}", flush=True)
    results["warnings"] = sorted(set(warnings))
    for w in results["warnings"]:
        print("warning:", w, flush=True)
    (out / "compile_probe.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
