"""The benchmark on a GPU with Qwen3-30B-A3B's shapes at a small token count and short timers: every
moe-tune run agrees with torch._grouped_mm (bf16), every variant gets its samples (the compiled
baseline included), the experts block runs against transformers eager and compiled with its output
and gradients in agreement, the host section counts launches, and a 1-layer training step runs
every mode with agreeing first-step losses."""

from __future__ import annotations

import importlib.util

import pytest

from moe_tune.bench.results import ALL_GEMM_VARIANTS, GRAPHED, STEP_MODES
from moe_tune.bench.timing import do_bench_timer
from moe_tune.models import find_preset
from moe_tune.problem import MoeShape

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore::moe_tune.errors.CacheWarning")]

QWEN3_30B = MoeShape(E=128, H=2048, I=768, topk=8)


def test_six_problems_agree_with_grouped_mm():
    from moe_tune.bench.gemms import bench_gemms

    rows = bench_gemms(QWEN3_30B, 512, dtype="bfloat16", device="cuda", timer=do_bench_timer(2, 10, min_samples=5),
                       compile_backend="inductor")
    assert [r.problem for r in rows] == QWEN3_30B.problems()
    for row in rows:
        assert not row.failed_checks and not row.failures, (row.problem.key, row.errors, row.failures)
        assert all(row.timings[v].ms > 0 and row.timings[v].n >= 5 for v in ALL_GEMM_VARIANTS)


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
def test_experts_block_against_transformers():
    from moe_tune.bench.block import bench_block, block_skip_reason, build_block

    assert block_skip_reason(find_preset("qwen3-30b-a3b").shape, "qwen3-30b-a3b") is None
    block = build_block(QWEN3_30B, "bfloat16", "cuda")
    rows = bench_block(block, QWEN3_30B, 512, dtype="bfloat16", device="cuda",
                       timer=do_bench_timer(2, 10, min_samples=5), compile_block=True)
    assert [r.implementation for r in rows] == ["grouped_mm", "grouped_mm+compile", "moe_tune", "moe_tune+compile"]
    for row in rows:
        assert row.error is None and not row.failed_checks, (row.implementation, row.error, row.errors)
        assert row.peak_mib and row.peak_mib > 0


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
def test_host_overhead_counts_launches():
    from moe_tune.bench.block import build_block
    from moe_tune.bench.host import bench_host

    block = build_block(QWEN3_30B, "bfloat16", "cuda")
    rows = bench_host(block, QWEN3_30B, tokens=128, dtype="bfloat16", device="cuda", iterations=5, repeats=2)
    assert [r.implementation for r in rows] == ["grouped_mm", "moe_tune"]
    for row in rows:
        assert row.error is None, row.error
        assert row.host.ms > 0 and row.wall.ms >= row.host.ms * 0.9
        assert row.kernels and row.kernels >= 6  # at least the six GEMMs


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
def test_training_steps_every_mode():
    from moe_tune.bench.run import BenchOptions, run_bench

    options = BenchOptions(model="qwen3-30b-a3b", shape=QWEN3_30B, family="qwen3_moe", tokens=(1024,), gemms=False,
                           block=False, host=False, step=True, step_layers=1, step_steps=2, step_seq_len=1024)
    report = run_bench(options, do_bench_timer(2, 10, min_samples=5))
    modes = STEP_MODES if "lora" not in report.step.mode_skipped else ("full", "frozen")
    assert {r.mode for r in report.step.rows} == set(modes)
    for row in report.step.rows:
        assert row.error is None, (row.mode, row.label, row.error)
        assert row.step.ms > 0 and row.peak_mib > 0
    assert not report.failed_checks, report.failed_checks
    # Eager full and frozen also run moe-tune with its CUDA graphs (8192 routed rows: graphed from the
    # second step), whose kept buffers show in its peak.
    rows = {(r.mode, r.label): r for r in report.step.rows}
    assert [(m, label) for m, label in rows if label == GRAPHED] == [("full", GRAPHED), ("frozen", GRAPHED)]
    for mode in ("full", "frozen"):
        assert rows[mode, GRAPHED].loss == rows[mode, "moe_tune"].loss  # the first step runs eagerly
        assert rows[mode, GRAPHED].peak_mib > rows[mode, "moe_tune"].peak_mib
