"""Six grouped-GEMM problems of one MoE layer: moe-tune's kernels against torch._grouped_mm.

A thin wrapper over ``moe_tune.bench`` (the GEMM half of ``moe-tune bench``). For each problem and
token count it times (``do_bench`` samples, L2 flushed before each, compilation and warm-up
excluded; median with p20–p80):

* ``tuned``: the launcher with the config the runtime loader resolves (cache, else the heuristic
  default; where it came from is printed), gather/scatter/weights fused;
* ``default``: the same launcher with the heuristic default config;
* ``grouped_mm``: what a user writes with ``torch._grouped_mm``: index to gather rows, the grouped
  GEMM, then weight/scatter/sum back to the layout the pass must return;
* ``grouped_mm+compile``: the same under ``torch.compile(fullgraph=True)`` (bfloat16; off with
  ``--no-compile``); speed-ups are taken against the better of the two;
* ``dense``: one cuBLAS matmul of the same FLOPs, the practical ceiling.

Routing metadata and inputs are built once, outside every timer. Prints the tables (card, driver,
torch and Triton in the header), writes the report as JSON with ``--out`` and as Markdown with
``--markdown``. Exit 1 when a moe-tune output disagrees with torch._grouped_mm's.

Run: ``python benchmarks/bench_grouped_gemm.py --model qwen3-30b-a3b --tokens 4096 16384``.
"""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = "Six grouped-GEMM problems of one MoE layer: moe-tune's kernels against torch._grouped_mm."


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    parser.add_argument("--model", default="qwen3-30b-a3b", help="a model preset (see `moe-tune models`)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--warmup", type=float, default=25, help="do_bench warm-up per measurement, ms")
    parser.add_argument("--rep", type=float, default=100, help="do_bench repetition time per measurement, ms")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd grouped_mm baseline")
    parser.add_argument("--out", help="write the report as JSON here")
    parser.add_argument("--markdown", help="write the tables as Markdown here")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("bench_grouped_gemm: needs a CUDA GPU", file=sys.stderr)
        return 2
    from moe_tune.bench import report as fmt
    from moe_tune.progress import RichProgress
    from moe_tune.bench.run import BenchOptions, run_bench
    from moe_tune.bench.timing import do_bench_timer
    from moe_tune.models import find_preset

    preset = find_preset(args.model)
    options = BenchOptions(model=preset.name, shape=preset.shape, family=preset.family, tokens=tuple(args.tokens),
                           dtype=args.dtype, seed=args.seed, block=False, host=False, compile=not args.no_compile)
    with RichProgress() as progress:
        result = run_bench(options, do_bench_timer(args.warmup, args.rep), progress)
    fmt.print_report(result)
    if args.out:
        fmt.write_text(fmt.to_json(result), args.out)
    if args.markdown:
        fmt.write_text(fmt.markdown(result), args.markdown)
    if result.failed_checks:
        print(f"bench_grouped_gemm: output disagrees with torch._grouped_mm: {'; '.join(result.failed_checks)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
