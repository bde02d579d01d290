"""The benchmark on a GPU with Qwen3-30B-A3B's shapes at a small token count and short timers: every
moe-tune run agrees with torch._grouped_mm (bf16), every variant gets its samples, and the experts
block runs against transformers with its output and gradients in agreement."""

from __future__ import annotations

import importlib.util

import pytest

from moe_tune.bench.results import GEMM_VARIANTS
from moe_tune.bench.timing import do_bench_timer
from moe_tune.problem import MoeShape

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore::moe_tune.errors.CacheWarning")]

QWEN3_30B = MoeShape(E=128, H=2048, I=768, topk=8)


def test_six_problems_agree_with_grouped_mm():
    from moe_tune.bench.gemms import bench_gemms

    rows = bench_gemms(QWEN3_30B, 512, dtype="bfloat16", device="cuda", timer=do_bench_timer(2, 10, min_samples=5))
    assert [r.problem for r in rows] == QWEN3_30B.problems()
    for row in rows:
        assert not row.failed_checks, (row.problem.key, row.errors)
        assert all(row.timings[v].ms > 0 and row.timings[v].n >= 5 for v in GEMM_VARIANTS)


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
def test_experts_block_against_transformers():
    from moe_tune.bench.block import bench_block, block_skip_reason, build_block

    assert block_skip_reason("qwen3_moe", "qwen3-30b-a3b") is None
    block = build_block(QWEN3_30B, "bfloat16", "cuda")
    rows = bench_block(block, QWEN3_30B, 512, dtype="bfloat16", device="cuda",
                       timer=do_bench_timer(2, 10, min_samples=5))
    assert [r.implementation for r in rows] == ["grouped_mm", "moe_tune"]
    assert not rows[1].failed_checks, rows[1].errors
    assert all(r.peak_mib and r.peak_mib > 0 for r in rows)
