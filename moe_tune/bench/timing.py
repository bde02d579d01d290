"""Timers for ``moe-tune bench``: a callable ``timer(fn, grad_to_none=None) -> Timing``.

Both timers run ``fn`` once and wait for it before measuring anything, so compilation, cache reads
and first allocations never land in a sample; ``do_bench`` then warms up for ``warmup_ms`` more.

* ``do_bench_timer`` (CUDA): ``triton.testing.do_bench``'s samples (each one launch between CUDA
  events, L2 flushed before it), summarised as median and p20–p80.
* ``wall_timer`` (Triton's CPU interpreter): the wall clock of ``repeats`` calls. Meaningless as a
  number; it lets the whole pipeline run in CI.
"""

from __future__ import annotations

import time
from typing import Callable, Protocol, Sequence

from moe_tune.bench.results import Timing


class Timer(Protocol):
    def __call__(self, fn: Callable[[], object], grad_to_none: Sequence | None = None) -> Timing: ...

    def describe(self) -> dict: ...


class DoBenchTimer:
    """``do_bench`` for ``rep_ms``, stretched so that even a slow ``fn`` gives ``min_samples``
    samples (a 17 ms experts-block fwd+bwd would otherwise get 5, too few for a p20–p80 spread)."""

    def __init__(self, warmup_ms: float = 25, rep_ms: float = 100, min_samples: int = 20):
        self.warmup_ms, self.rep_ms, self.min_samples = warmup_ms, rep_ms, min_samples

    def __call__(self, fn, grad_to_none=None) -> Timing:
        import torch
        from triton.testing import do_bench

        fn()  # compile, read caches, allocate: outside every sample
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        rep_ms = max(self.rep_ms, self.min_samples * start.elapsed_time(end))
        samples = do_bench(fn, warmup=self.warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, return_mode="all")
        return Timing.from_samples(samples)

    def describe(self) -> dict:
        return {"timer": "triton.testing.do_bench", "warmup_ms": self.warmup_ms, "rep_ms": self.rep_ms,
                "min_samples": self.min_samples, "l2_flushed": True}


class WallTimer:
    def __init__(self, repeats: int = 1):
        self.repeats = repeats

    def __call__(self, fn, grad_to_none=None) -> Timing:
        fn()
        samples = []
        for _ in range(self.repeats):
            for t in grad_to_none or ():
                t.grad = None
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return Timing.from_samples(samples)

    def describe(self) -> dict:
        return {"timer": "wall clock (Triton interpreter: times are meaningless)", "repeats": self.repeats}


def do_bench_timer(warmup_ms: float = 25, rep_ms: float = 100, min_samples: int = 20) -> DoBenchTimer:
    return DoBenchTimer(warmup_ms, rep_ms, min_samples)


def wall_timer(repeats: int = 1) -> WallTimer:
    return WallTimer(repeats)
