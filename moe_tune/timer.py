"""The one GPU timer of moe-tune: the sweep's workers (screens, settles, the head-to-head against the
default), ``moe-tune verify`` and ``moe-tune bench`` all time with it, so a config that one of them
finds faster is measured the same way by the others. (Two timers once disagreed by 4-10% on
which of two configs was faster.) This is the only module of moe-tune that creates CUDA events.

Data flow of ``GpuTimer(...).samples(fn)``:

1. ``prepare``: ``fn`` runs once and the device synchronises, so compilation, cache reads and
   first allocations land outside every sample; with ``graph=True``, ``fn`` is then captured into
   a CUDA graph and the samples time its replay: a Python launcher costs ~100 µs of host time,
   more than a small kernel runs, and a replay costs a few µs. When capture fails (or
   ``grad_to_none`` asks for gradient resets between runs), ``fn`` itself is timed;
2. ``run_samples``: the repetition time is ``rep_ms``, stretched or cut so that the samples
   number between ``min_samples`` and ``max_samples`` by one timed (L2 flush + run); then
   ``triton.testing.do_bench(run, warmup_ms, rep, return_mode="all")``: every sample is one run
   between CUDA events, after Triton's L2 flush (a 256 MB write), so every run starts with a cold
   L2 as a GEMM in a training step does. The flush also keeps the GPU behind the host: it takes
   longer on the GPU than enqueuing a graph replay takes on the host, so no sample spans a wait
   for the host.

``interleaved(runs, run_samples, rounds)`` times several prepared runs in rounds, the order
alternating (A B, B A, …), so a drift of clocks or heat over the seconds it takes favours none of
them: the sweep's head to head against the default and the bench's tuned-against-default
comparison both time this way.

``summarise`` turns samples into the median and the p20–p80 range (linear interpolation between
ranks, triton.testing's rule). ``WallTimer`` is the stand-in under Triton's CPU interpreter: the
wall clock of each call, meaningless as a number, so that the same pipelines run in CI.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence


@dataclass(frozen=True)
class Summary:
    """Median and spread of a list of per-run times, in milliseconds."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float
    n: int

    @property
    def spread_ms(self) -> float:
        """p80 − p20: the middle 60% of the samples."""
        return self.p80_ms - self.p20_ms


def quantile(ordered: Sequence[float], q: float) -> float:
    """The ``q`` quantile of sorted values, interpolated linearly between the closest ranks."""
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def interleaved(runs: Sequence[Callable[[], Any]], run_samples: Callable[[Callable[[], Any]], list[float]],
                rounds: int) -> list[list[float]]:
    """Per run, the samples ``run_samples(run)`` gave over ``rounds`` interleaved rounds."""
    samples: list[list[float]] = [[] for _ in runs]
    for round_ in range(rounds):
        order = range(len(runs)) if round_ % 2 == 0 else reversed(range(len(runs)))
        for i in order:
            samples[i].extend(run_samples(runs[i]))
    return samples


def summarise(samples: Sequence[float]) -> Summary:
    if not samples:
        raise ValueError("a timing needs at least one sample")
    ordered = sorted(float(s) for s in samples)
    return Summary(median_ms=statistics.median(ordered), p20_ms=quantile(ordered, 0.2),
                   p80_ms=quantile(ordered, 0.8), min_ms=ordered[0], n=len(ordered))


class GpuTimer:
    """``samples(fn)`` → per-run milliseconds (module docstring); calling it gives their ``Summary``.
    ``prepare`` and ``run_samples`` are its two halves, for a caller that times one ``fn`` several
    times (a head to head's rounds): the warm-up and the graph capture are paid once."""

    def __init__(self, *, warmup_ms: float = 25.0, rep_ms: float = 100.0, min_samples: int = 1,
                 max_samples: int | None = None, graph: bool = False):
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms
        self.min_samples, self.max_samples = min_samples, max_samples
        self.graph = graph

    def __call__(self, fn: Callable[[], Any], grad_to_none: Sequence | None = None) -> Summary:
        return summarise(self.samples(fn, grad_to_none))

    def samples(self, fn: Callable[[], Any], grad_to_none: Sequence | None = None) -> list[float]:
        return self.run_samples(self.prepare(fn, grad_to_none), grad_to_none)

    def prepare(self, fn: Callable[[], Any], grad_to_none: Sequence | None = None) -> Callable[[], Any]:
        """What the samples time: the replay of a CUDA graph of ``fn`` (``graph`` on, no gradient
        resets, capture possible), else ``fn``; either way warm (run once, synchronised)."""
        import torch

        if self.graph and grad_to_none is None:
            graph = _capture(fn)  # its first run, outside the capture, is the warm-up
            if graph is not None:
                return graph.replay  # the bound method keeps the graph alive
        else:
            fn()
        torch.cuda.synchronize()
        return fn

    def run_samples(self, run: Callable[[], Any], grad_to_none: Sequence | None = None) -> list[float]:
        """``do_bench``'s samples of a prepared ``run``, their number bounded as the module says."""
        from triton.testing import do_bench

        rep_ms = self.rep_ms
        if self.min_samples > 1 or self.max_samples is not None:
            per_run = _flushed_run_ms(run)
            rep_ms = max(rep_ms, self.min_samples * per_run)
            if self.max_samples is not None:
                rep_ms = min(rep_ms, self.max_samples * per_run)
        samples = [float(s) for s in do_bench(run, warmup=self.warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                                return_mode="all")]
        # do_bench sizes its repeats from its own estimate, which can undershoot a short run's cost
        # by far (900 samples asked for 12 on an H200): the bound is kept here, the latest kept.
        if self.max_samples is not None:
            samples = samples[-self.max_samples:]
        return samples

    def describe(self) -> dict[str, Any]:
        return {"timer": "triton.testing.do_bench", "warmup_ms": self.warmup_ms, "rep_ms": self.rep_ms,
                "min_samples": self.min_samples, "max_samples": self.max_samples, "cuda_graph": self.graph,
                "l2_flushed": True}


class WallTimer:
    """The interpreter's timer: ``fn`` once (unless ``warm_up`` is off: the caller has just run
    it), then the wall clock of ``repeats`` calls. Same interface as ``GpuTimer``."""

    def __init__(self, repeats: int = 1, *, warm_up: bool = True):
        self.repeats, self.warm_up = repeats, warm_up

    def __call__(self, fn: Callable[[], Any], grad_to_none: Sequence | None = None) -> Summary:
        return summarise(self.samples(fn, grad_to_none))

    def samples(self, fn: Callable[[], Any], grad_to_none: Sequence | None = None) -> list[float]:
        return self.run_samples(self.prepare(fn, grad_to_none), grad_to_none)

    def prepare(self, fn: Callable[[], Any], grad_to_none: Sequence | None = None) -> Callable[[], Any]:
        if self.warm_up:
            fn()
        return fn

    def run_samples(self, run: Callable[[], Any], grad_to_none: Sequence | None = None) -> list[float]:
        samples = []
        for _ in range(self.repeats):
            for t in grad_to_none or ():
                t.grad = None
            start = time.perf_counter()
            run()
            samples.append((time.perf_counter() - start) * 1e3)
        return samples

    def describe(self) -> dict[str, Any]:
        return {"timer": "wall clock (Triton interpreter: times are meaningless)", "repeats": self.repeats}


def _flushed_run_ms(run: Callable[[], Any]) -> float:
    """GPU time of one L2 flush plus one ``run``: what one of ``do_bench``'s samples costs it."""
    import torch
    import triton

    active = triton.runtime.driver.active
    cache = active.get_empty_cache_for_benchmark()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    active.clear_cache(cache)
    run()
    end.record()
    torch.cuda.synchronize()
    return max(start.elapsed_time(end), 1e-4)


def _capture(fn: Callable[[], Any]):
    """A CUDA graph replaying ``fn``, or None when it cannot be captured."""
    import torch

    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graph.replay()
        torch.cuda.synchronize()
        return graph
    except Exception:  # any op that cannot be captured: time fn eagerly instead
        torch.cuda.synchronize()
        return None
