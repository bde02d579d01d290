"""Compile the grouped-GEMM kernels for sm90 (H100/H200) on any machine — no GPU, Triton's bundled
ptxas — and print a hash of each variant's SASS, and its count of MMA instructions in the PTX.

What it is for: showing that a kernel edit leaves the machine code of the shipped (bf16) kernels
unchanged, so the caches tuned against the old source still hold, without spending device time.
Run it before and after the edit and compare the hashes (line-number debug info is not hashed).

    python3 benchmarks/sm90_sass.py                       # the launcher's constexprs for each dtype
    python3 benchmarks/sm90_sass.py --precision fp32=tf32 # force tl.dot's input precision per dtype
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# (kind, flags): the forward/dx launch's layouts the block uses, and the expert-ordered dW.
VARIANTS = (
    ("mm", dict(GATHER_A=True, SCATTER_C=False, TRANS_W=False, SORT_A=False, TMA_LOAD=True)),   # up forward
    ("mm", dict(GATHER_A=False, SCATTER_C=True, TRANS_W=True, SORT_A=False, TMA_LOAD=True)),   # up dx
    ("mm", dict(GATHER_A=True, SCATTER_C=False, TRANS_W=False, SORT_A=True, TMA_LOAD=True)),   # gpt-oss sort
    ("mm", dict(GATHER_A=False, SCATTER_C=False, TRANS_W=False, SORT_A=False, TMA_LOAD=False)),  # pointers
    ("dw", dict(TMA_LOAD=True)),
)
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def sass_of(cubin: bytes) -> str:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        text = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    return "\n".join(line for line in text.splitlines() if re.search(r"/\*[0-9a-f]{4}\*/", line))


def compile_variant(kind: str, flags: dict, dt: str, precision: str | None):
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from moe_tune.kernels.grouped_mm import grouped_mm_dw_kernel, grouped_mm_kernel
    from moe_tune.ops.launch import dot_precision

    kernel = grouped_mm_kernel if kind == "mm" else grouped_mm_dw_kernel
    big = dt == "bf16"
    if kind == "mm":
        meta = dict(E=128, E_POW2=256, WEIGHTED=flags["SCATTER_C"], BLOCK_M=128, BLOCK_N=256 if big else 128,
                    BLOCK_K=64 if big else 32, GROUP_M=8, TMA_STORE=False, NUM_SMS=132, **flags)
    else:
        meta = dict(E=128, GATHER_DY=False, GATHER_X=False, WEIGHTED=False, BLOCK_M=64, BLOCK_N=128,
                    BLOCK_K=256 if big else 128, GROUP_M=8, TMA_STORE=True, NUM_SMS=132, **flags)
    names = [p.name for p in kernel.params]
    if "DOT_PRECISION" in names:
        meta["DOT_PRECISION"] = precision or dot_precision(getattr(torch, DTYPES[dt]))
    if "WARP_SPEC" in names:
        meta["WARP_SPEC"] = False
    ints = {"expert_offsets_ptr": "*i32", "sorted_slots_ptr": "*i32"}
    signature = {n: "constexpr" if n in meta else (ints.get(n, f"*{dt}") if n.endswith("_ptr") else "i32")
                 for n in names}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=meta),
                              target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8, num_stages=3))
    ptx = compiled.asm["ptx"]
    sass = sass_of(compiled.asm["cubin"])
    return hashlib.sha256(sass.encode()).hexdigest()[:16], len(sass.splitlines()), \
        ptx.count("wgmma.mma_async") + ptx.count("mma.sync"), meta.get("DOT_PRECISION")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", action="append", default=[], metavar="DTYPE=PRECISION",
                        help="tl.dot input precision for a dtype (bf16 or fp32), e.g. fp32=tf32")
    args = parser.parse_args(argv)
    forced = dict(item.split("=", 1) for item in args.precision)
    for dt in DTYPES:
        for kind, flags in VARIANTS:
            digest, lines, mma, precision = compile_variant(kind, flags, dt, forced.get(dt))
            layout = " ".join(f"{k}={int(v)}" for k, v in flags.items())
            print(f"{kind} {dt} {layout} precision={precision}: sass {digest} ({lines} lines), {mma} MMA in PTX")
    return 0


if __name__ == "__main__":
    sys.exit(main())
