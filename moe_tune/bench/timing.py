"""Timers for ``moe-tune bench``: a callable ``timer(fn, grad_to_none=None) -> Timing``, over the one
GPU timer the sweep also uses (``moe_tune.timer``), so that the bench measures a tuned config and
the heuristic default the way the sweep compared them.

* ``do_bench_timer`` (CUDA): ``triton.testing.do_bench``'s samples (each one launch between CUDA
  events, L2 flushed before it), summarised as median and p20–p80; ``fn`` runs once before
  anything is measured, and ``do_bench`` warms up for ``warmup_ms`` more.
* ``wall_timer`` (Triton's CPU interpreter): the wall clock of ``repeats`` calls. Meaningless as a
  number; it lets the whole pipeline run in CI.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

from moe_tune.bench.results import Timing
from moe_tune.timer import GpuTimer, Summary, interleaved, summarise
from moe_tune.timer import WallTimer as _Wall


# Rounds of a comparison (``Timer.versus``): the sweep's head to head runs 4 as well.
VERSUS_ROUNDS = 4


class Timer(Protocol):
    def __call__(self, fn: Callable[[], object], grad_to_none: Sequence | None = None) -> Timing: ...

    def versus(self, fns: Sequence[Callable[[], object]], rounds: int = VERSUS_ROUNDS) -> list[Timing]: ...

    def describe(self) -> dict: ...


def _timing(summary: Summary) -> Timing:
    return Timing(ms=summary.median_ms, p20=summary.p20_ms, p80=summary.p80_ms, min=summary.min_ms, n=summary.n)


class DoBenchTimer:
    """``do_bench`` for ``rep_ms``, stretched so that even a slow ``fn`` gives ``min_samples``
    samples (a 17 ms experts-block fwd+bwd would otherwise get 5, too few for a p20–p80 spread)."""

    def __init__(self, warmup_ms: float = 25, rep_ms: float = 100, min_samples: int = 20):
        self.warmup_ms, self.rep_ms, self.min_samples = warmup_ms, rep_ms, min_samples
        self._timer = GpuTimer(warmup_ms=warmup_ms, rep_ms=rep_ms, min_samples=min_samples)

    def __call__(self, fn, grad_to_none=None) -> Timing:
        return _timing(self._timer(fn, grad_to_none))

    def versus(self, fns, rounds: int = VERSUS_ROUNDS) -> list[Timing]:
        return _versus(self._timer, fns, rounds)

    def describe(self) -> dict:
        return {"timer": "triton.testing.do_bench", "warmup_ms": self.warmup_ms, "rep_ms": self.rep_ms,
                "min_samples": self.min_samples, "l2_flushed": True}


class WallTimer:
    def __init__(self, repeats: int = 1):
        self.repeats = repeats
        self._timer = _Wall(repeats)

    def __call__(self, fn, grad_to_none=None) -> Timing:
        return _timing(self._timer(fn, grad_to_none))

    def versus(self, fns, rounds: int = VERSUS_ROUNDS) -> list[Timing]:
        return _versus(self._timer, fns, rounds)

    def describe(self) -> dict:
        return self._timer.describe()


def _versus(timer, fns, rounds: int) -> list[Timing]:
    """``fns`` timed against each other in interleaved rounds (``moe_tune.timer.interleaved``),
    each round the timer's whole repetition time; one ``Timing`` per function."""
    runs = [timer.prepare(fn) for fn in fns]
    samples = interleaved(runs, timer.run_samples, rounds)
    return [_timing(summarise(s)) for s in samples]


def do_bench_timer(warmup_ms: float = 25, rep_ms: float = 100, min_samples: int = 20) -> DoBenchTimer:
    return DoBenchTimer(warmup_ms, rep_ms, min_samples)


def wall_timer(repeats: int = 1) -> WallTimer:
    return WallTimer(repeats)
