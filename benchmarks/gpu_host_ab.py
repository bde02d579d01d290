"""The bench's host-time rows for moe-tune alone, eager and with its CUDA graphs, in one process:
for interleaved A/B runs of two checkouts on one machine (a shell loop alternating them), where the
full host section would compile the baselines in every round.

Each row is ``moe_tune.bench.host``'s measurement (loops of fwd+bwd calls that never synchronise,
through transformers' experts module, medians of 15 repeats), at ``--tokens`` (default 128).
Prints one JSON line and appends it to ``OUT/host_ab.jsonl`` with ``--tag``.

    PYTHONPATH=TREE python3 benchmarks/gpu_host_ab.py --out DIR --tag new [--model qwen3-30b-a3b] \
        [--labels moe_tune moe_tune+cuda_graphs moe_tune+compile]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import probe_args  # noqa: E402


def main(argv=None) -> int:
    import argparse

    tag_ap = argparse.ArgumentParser(add_help=False)
    tag_ap.add_argument("--tag", required=True)
    tag_ap.add_argument("--labels", nargs="+", default=["moe_tune", "moe_tune+cuda_graphs"],
                        help="rows to time: moe_tune, moe_tune+cuda_graphs, moe_tune+compile")
    tag, rest = tag_ap.parse_known_args(argv)
    args, out_dir = probe_args.parse(rest, __doc__.splitlines()[0], [128])

    from moe_tune import models
    from moe_tune.bench.block import block_inputs, build_block
    from moe_tune.bench.host import GRAPHED, _cuda_graphs, _measure

    shape = models.load_preset(args.model)
    block = build_block(shape, "bfloat16", "cuda")
    row = {"tag": tag.tag}
    for T in args.tokens:
        inputs = block_inputs(block, shape, T, "bfloat16", "cuda")
        for label in tag.labels:
            with _cuda_graphs(label == GRAPHED):
                result = _measure(block, label, inputs, "cuda", iterations=50, repeats=15, compile_backend="inductor")
            inputs.clear()
            row[f"{label}@{T}"] = {"host_ms": result.host.ms if result.host else None,
                                   "wall_ms": result.wall.ms if result.wall else None,
                                   "kernels": result.kernels, "memops": result.memops, "error": result.error}
    line = json.dumps(row)
    print(line, flush=True)
    with open(out_dir / "host_ab.jsonl", "a") as f:
        f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
