"""The experts block of a Qwen3-MoE layer: moe-tune's ``moe_experts`` against transformers'
``grouped_mm`` experts implementation, each eager and under ``torch.compile``, forward and
forward+backward, and the block's host overhead.

A thin wrapper over ``moe_tune.bench.block`` (the block half of ``moe-tune bench``). One
``Qwen3MoeSparseMoeBlock`` is built from a config with random weights (no download) and its
experts module is timed under both implementations, with the same weights and the same routing:
the router runs once, outside every timer, and its ``top_k_index``/``top_k_weights`` are reused.
Forward times a training forward (autograd recording); forward+backward adds the backward of a
fixed output gradient into every input (hidden states, both weight stacks, routing weights).
``do_bench`` medians with p20/p80 spread, warmup excluded; peak memory of one fwd+bwd beside; the
output and gradients of every row checked against eager transformers'; speed-ups against the
faster grouped_mm row. Host time and GPU launches per fwd+bwd at 128 tokens follow. moe-tune's
configs come from the runtime loader (the cache, else the heuristic default); the source of each
of the six is printed.

Run: ``python benchmarks/bench_moe_block.py --out results/block.json`` (``--tokens``,
``--no-compile``, ``--no-host``, ``--model`` for another Qwen3-MoE preset).
"""

from __future__ import annotations

import argparse
import os
import sys

DESCRIPTION = ("The experts block of a Qwen3-MoE layer: moe-tune's moe_experts against transformers' "
               "grouped_mm experts implementation.")

# DESIGN.md: transformers 5.17 grouped_mm experts block of Qwen3-30B-A3B, fwd+bwd, one H200 (ms);
# targets are moe-tune at least 2x faster at 16384 tokens and 1.5x at 4096.
ANCHOR_MODEL = "qwen3-30b-a3b"
ANCHOR_MS = {4096: 5.29, 16384: 17.46}
TARGET_RATIO = {4096: 1.5, 16384: 2.0}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    parser.add_argument("--model", default=ANCHOR_MODEL, help="a Qwen3-MoE model preset")
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the torch.compile(fullgraph=True) rows of grouped_mm and moe-tune")
    parser.add_argument("--no-host", action="store_true", help="skip the host-overhead rows")
    parser.add_argument("--warmup", type=float, default=25, help="do_bench warm-up per measurement, ms")
    parser.add_argument("--rep", type=float, default=100, help="do_bench repetition time per measurement, ms")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the report as JSON to this file")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("bench_moe_block: needs a CUDA GPU", file=sys.stderr)
        return 2
    from moe_tune.bench import report as fmt
    from moe_tune.bench.block import block_skip_reason, config_sources
    from moe_tune.progress import RichProgress
    from moe_tune.bench.results import is_baseline
    from moe_tune.bench.run import BenchOptions, run_bench
    from moe_tune.bench.timing import do_bench_timer
    from moe_tune.models import find_preset

    preset = find_preset(args.model)
    skipped = block_skip_reason(preset.family, preset.name)
    if skipped:
        print(f"bench_moe_block: {skipped}", file=sys.stderr)
        return 2
    options = BenchOptions(model=preset.name, shape=preset.shape, family=preset.family, tokens=tuple(args.tokens),
                           dtype=args.dtype, seed=args.seed, gemms=False, host=not args.no_host,
                           compile=not args.no_compile)
    with RichProgress() as progress:
        result = run_bench(options, do_bench_timer(args.warmup, args.rep), progress)
    fmt.print_report(result)
    for tokens in args.tokens:
        for key, config, source in config_sources(preset.shape, tokens, args.dtype, "cuda"):
            print(f"  T={tokens:<6d} config {key:52s} {config:28s} from {source}")
    if preset.name == ANCHOR_MODEL:
        for row in result.block.rows:
            speedup = result.block.speedup(row, "fwd_bwd")
            if row.implementation == "grouped_mm" and row.fwd_bwd and row.tokens in ANCHOR_MS:
                print(f"T={row.tokens}: transformers grouped_mm eager fwd+bwd {row.fwd_bwd.ms:.2f} ms "
                      f"(DESIGN.md anchor on H200: {ANCHOR_MS[row.tokens]:.2f} ms)")
            elif speedup is not None and not is_baseline(row.implementation) and row.tokens in TARGET_RATIO:
                print(f"T={row.tokens}: {row.implementation} fwd+bwd {speedup:.2f}x the best transformers "
                      f"grouped_mm row (target {TARGET_RATIO[row.tokens]:.1f}x)")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        fmt.write_text(fmt.to_json(result), args.out)
    if result.failed_checks:
        print(f"bench_moe_block: output disagrees with transformers or failed: {'; '.join(result.failed_checks)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
