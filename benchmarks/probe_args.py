"""What the GPU probes of this folder share: their command line (an output folder, a model preset,
token counts), a median timer, a config's gated timing on a tuning case, and a warmed experts
block fwd+bwd."""

from __future__ import annotations

import argparse
from pathlib import Path


def parse(argv, description: str, tokens: list[int], flags: tuple[str, ...] = ()) -> tuple[argparse.Namespace, Path]:
    """``--out DIR`` (created), ``--model PRESET``, ``--tokens T ...`` and the on/off ``flags``
    (e.g. ``("--pairs",)``): (the arguments, the folder)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="qwen3-30b-a3b")
    ap.add_argument("--tokens", type=int, nargs="+", default=tokens)
    for flag in flags:
        ap.add_argument(flag, action="store_true")
    args = ap.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    return args, out_dir


def median_ms(fn, rep: int = 60) -> float:
    """``triton.testing.do_bench``'s median, ms (L2 flushed between repeats)."""
    import triton

    return triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median")


def time_config(case, cfg) -> dict:
    """``cfg`` on ``case`` (``moe_tune.tuning.cases.Case``): checked once against the float32
    reference on a NaN-poisoned output, then timed. ``{ms, tflops, err}``, or ``{error}`` when the
    launch fails or misses the reference (a failing config is a row, not the end of a probe)."""
    from moe_tune.reference import relative_error

    try:
        err = relative_error(case.launch(cfg), case.reference)
        if not err < 2e-2:  # NaN (an unwritten tile) reads inf and fails too
            raise RuntimeError(f"error {err:.2e}")
        o = case.new_output()
        ms = median_ms(lambda: case.launch(cfg, o))
        return dict(ms=ms, tflops=case.problem.flops(case.tokens) / ms / 1e9, err=err)
    except Exception as exc:
        return dict(error=f"{type(exc).__name__}: {str(exc)[:200]}")


def warmed_block_call(block, label: str, inputs, warm: int = 3):
    """(prepared, call): ``label``'s experts block prepared on ``inputs``
    (``moe_tune.bench.block.prepare``) and one fwd+bwd that clears the gradients first, called
    ``warm`` times, then the GPU synchronised."""
    import torch

    from moe_tune.bench.block import prepare

    prepared = prepare(block, label, inputs)

    def call():
        inputs.clear()
        prepared.fwd_bwd()

    for _ in range(warm):
        call()
    torch.cuda.synchronize()
    return prepared, call
