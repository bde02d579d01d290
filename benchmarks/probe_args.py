"""What the GPU probes of this folder share: their command line (an output folder, a model preset,
token counts) and a median timer."""

from __future__ import annotations

import argparse
from pathlib import Path


def parse(argv, description: str, tokens: list[int]) -> tuple[argparse.Namespace, Path]:
    """``--out DIR`` (created), ``--model PRESET``, ``--tokens T ...``: (the arguments, the folder)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="qwen3-30b-a3b")
    ap.add_argument("--tokens", type=int, nargs="+", default=tokens)
    args = ap.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    return args, out_dir


def median_ms(fn, rep: int = 60) -> float:
    """``triton.testing.do_bench``'s median, ms (L2 flushed between repeats)."""
    import triton

    return triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median")
