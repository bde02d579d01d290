"""Interleaved A/B of a few configs of one problem: which is faster when the card's clock moves.

Under sustained load an H200's SM clock falls from ~1980 to ~1600 MHz, so two configs timed one
after the other can trade places with the card's temperature. Here each round times every config
once (``do_bench`` median, L2 flushed), the order reversed every other round, and the report is
each config's median over rounds and how many rounds it won. Every config is gated once against
the float32 reference first. Writes ``OUT/ab.json``.

    python3 benchmarks/gpu_ab_probe.py --out DIR --model gpt-oss-20b --tokens 16384 --gemm up --pass forward \
        --configs "128x256x64 g8 w8 s3 tma:L" "128x256x64 g8 w8 s3 tma:L copy" [--rounds 8]

A config is written as ``KernelConfig.short()`` prints it (``tma:L``, ``tma:LS``, ``copy``, ``ws``,
``p2``); ``cache`` stands for the config the runtime resolves.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import probe_args  # noqa: E402


def parse_config(text: str):
    """``KernelConfig`` from its ``short()`` form, e.g. ``128x256x64 g8 w8 s3 tma:LS copy ws p2``."""
    from moe_tune.problem import KernelConfig

    m = re.fullmatch(r"(\d+)x(\d+)x(\d+) g(\d+) w(\d+) s(\d+)((?: \S+)*)", text.strip())
    if not m:
        raise SystemExit(f"cannot read config {text!r}")
    bm, bn, bk, g, w, s = (int(v) for v in m.groups()[:6])
    flags = m.group(7).split()
    tma = next((f[4:] for f in flags if f.startswith("tma:")), "")
    programs = next((int(f[1:]) for f in flags if re.fullmatch(r"p\d+", f)), 1)
    return KernelConfig(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=g, num_warps=w, num_stages=s,
                        TMA_LOAD="L" in tma, TMA_STORE="S" in tma, GATHER_COPY="copy" in flags,
                        WARP_SPEC="ws" in flags, PROGRAMS_PER_SM=programs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", type=int, required=True)
    ap.add_argument("--gemm", choices=("up", "down"), required=True)
    ap.add_argument("--pass", dest="pass_", choices=("forward", "dx", "dw"), required=True)
    ap.add_argument("--configs", nargs="+", required=True)
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    import torch

    from moe_tune import models, runtime
    from moe_tune.device import query_device
    from moe_tune.reference import relative_error
    from moe_tune.tuning.cases import Case
    from moe_tune.tuning.routing_spec import RoutingSpec

    info = query_device(torch.device("cuda"))
    problem = next(p for p in models.load_preset(args.model).problems() if (p.gemm, p.pass_) == (args.gemm, args.pass_))
    configs = [runtime.get_config(problem, args.tokens, info) if c == "cache" else parse_config(c) for c in args.configs]
    case = Case(problem, args.tokens, RoutingSpec(), 0, "cuda")
    outputs = []
    for cfg in configs:
        err = relative_error(case.launch(cfg), case.reference)
        if not err < 2e-2:
            raise SystemExit(f"{cfg.short()} misses the reference: relative error {err:.2e}")
        outputs.append(case.new_output())
    times = [[] for _ in configs]
    for r in range(args.rounds):
        order = list(range(len(configs)))[:: 1 if r % 2 == 0 else -1]
        for i in order:
            times[i].append(probe_args.median_ms(lambda: case.launch(configs[i], outputs[i])))
    wins = [sum(1 for r in range(args.rounds) if min(range(len(configs)), key=lambda i: times[i][r]) == j)
            for j in range(len(configs))]
    rows = [dict(config=c.short(), median_ms=statistics.median(t), ms=t, wins=w) for c, t, w in zip(configs, times, wins)]
    for row in rows:
        print(f"{args.model} T={args.tokens} {args.gemm} {args.pass_}: {row['config']:36s} "
              f"median {row['median_ms']:.4f} ms over {args.rounds} rounds, won {row['wins']}", flush=True)
    path = out_dir / "ab.json"
    previous = json.loads(path.read_text()) if path.exists() else []
    previous.append(dict(device=info.name, model=args.model, tokens=args.tokens, problem=problem.key, rows=rows))
    path.write_text(json.dumps(previous, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
