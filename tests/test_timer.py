"""The one GPU timer (moe_tune/timer.py): the summary rule (median, p20, p80 interpolated like
triton.testing), the interpreter's wall-clock stand-in, and on a GPU the real thing: samples
bounded by ``min_samples``/``max_samples``, CUDA-graph replay, and the bench's timers built on it."""

from __future__ import annotations

import statistics

import pytest
import torch

from moe_tune.timer import GpuTimer, WallTimer, quantile, summarise


def test_summary_rule(rng):
    samples = [rng.uniform(1.0, 2.0) for _ in range(rng.randint(2, 60))]
    s = summarise(samples)
    ordered = sorted(samples)
    assert s.median_ms == statistics.median(samples) and s.min_ms == ordered[0] and s.n == len(samples)
    # Linear interpolation between closest ranks: what statistics' "inclusive" method computes.
    deciles = statistics.quantiles(ordered, n=10, method="inclusive")
    assert s.p20_ms == pytest.approx(deciles[1]) and s.p80_ms == pytest.approx(deciles[7])
    assert s.spread_ms == pytest.approx(s.p80_ms - s.p20_ms)
    one = summarise([3.0])
    assert (one.median_ms, one.p20_ms, one.p80_ms, one.spread_ms) == (3.0, 3.0, 3.0, 0.0)
    assert quantile([1.0, 2.0], 0.5) == 1.5
    with pytest.raises(ValueError):
        summarise([])


def test_wall_timer_counts_calls_and_resets_gradients():
    calls = []
    param = torch.zeros(1, requires_grad=True)
    param.grad = torch.ones(1)

    def fn():
        calls.append(param.grad)

    assert len(WallTimer(3).samples(fn, grad_to_none=[param])) == 3
    assert len(calls) == 4 and calls[0] is not None and calls[1:] == [None] * 3  # warm-up, then reset before each
    calls.clear()
    assert WallTimer(2, warm_up=False)(fn).n == 2 and len(calls) == 2
    # Prepared once, sampled in several rounds (a head to head): one warm-up in all.
    calls.clear()
    timer = WallTimer(2)
    run = timer.prepare(fn)
    assert [len(timer.run_samples(run)) for _ in range(3)] == [2, 2, 2] and len(calls) == 1 + 3 * 2


@pytest.mark.gpu
@pytest.mark.parametrize("graph", [False, True])
def test_gpu_timer_bounds_its_samples(graph):
    a = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)

    def fn():
        a @ a

    # The bounds hold up to do_bench's own estimate of a run, which may differ from the timer's.
    few = GpuTimer(warmup_ms=1, rep_ms=1000, max_samples=12, graph=graph).samples(fn)
    assert 1 <= len(few) <= 18 and all(s > 0 for s in few)
    many = GpuTimer(warmup_ms=1, rep_ms=0.001, min_samples=30, graph=graph)(fn)
    assert many.n >= 20 and many.p20_ms <= many.median_ms <= many.p80_ms
    timer = GpuTimer(warmup_ms=0, rep_ms=2, max_samples=5, graph=graph)
    run = timer.prepare(fn)
    assert all(1 <= len(timer.run_samples(run)) <= 8 for _ in range(3))


@pytest.mark.gpu
def test_the_bench_times_with_it():
    from moe_tune.bench.timing import do_bench_timer

    a = torch.randn(1024, 1024, device="cuda")
    timing = do_bench_timer(1, 5, min_samples=10)(lambda: a @ a)
    assert timing.n >= 8 and timing.p20 <= timing.ms <= timing.p80


def test_bench_versus_interleaves_the_runs_it_compares():
    """``bench.timing``'s comparison: each function prepared (warmed) once, then timed in
    alternating rounds; one Timing per function from all its samples."""
    from moe_tune.bench.timing import WallTimer as BenchWallTimer

    calls = []
    timings = BenchWallTimer(repeats=2).versus([lambda: calls.append("A"), lambda: calls.append("B")], rounds=3)
    assert calls == ["A", "B"] + ["A", "A", "B", "B", "B", "B", "A", "A", "A", "A", "B", "B"]
    assert [t.n for t in timings] == [6, 6]
