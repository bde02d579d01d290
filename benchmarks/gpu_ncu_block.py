"""One experts-block fwd+bwd per (preset, token count) between ``cudaProfilerStart`` and ``Stop``, for
Nsight Compute: every launch of the block, warmed (compiled) outside the profiled range.

    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section Occupancy \\
        --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis \\
        python3 benchmarks/gpu_ncu_block.py --presets gpt-oss-20b --tokens 4096

``--clock-control none`` leaves the card's clocks as they are (the device notes ask for it), so a
kernel's duration here reads as it does in the bench, not at a locked base clock. The inputs are
``gpu_kernel_timeline.block_call``'s.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_kernel_timeline import block_call  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["gpt-oss-20b"])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096])
    args = ap.parse_args(argv)

    import torch

    from moe_tune import models

    for preset in args.presets:
        for T in args.tokens:
            call = block_call(models.load_preset(preset), T)
            for _ in range(2):
                call()
            torch.cuda.synchronize()
            print(f"profiled: {preset} T={T}", flush=True)
            torch.cuda.profiler.start()
            call()
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
