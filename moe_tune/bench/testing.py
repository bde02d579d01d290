"""Synthetic benchmark reports for tests: random but plausible rows, no GPU and no torch needed.

Each call draws fresh values from the ``random.Random`` it is given (seeded per test run), like
``moe_tune.cache.testing``.
"""

from __future__ import annotations

import random

from moe_tune.bench.results import (BLOCK_BASELINE, BenchReport, BlockRow, BlockSection, ConfigSource, GemmRow,
                                    Timing)
from moe_tune.problem import KernelConfig, MoeShape

QWEN3_30B = MoeShape(E=128, H=2048, I=768, topk=8)

ENVIRONMENT = {"card": "NVIDIA H200", "driver": "580.159.04", "torch": "2.11.0+cu130", "triton": "3.6.0",
               "cuda": "13.0", "transformers": "5.17.0", "moe_tune": "0.1.0", "python": "3.12.3",
               "date": "2026-11-27"}


def random_timing(rng: random.Random, around_ms: float) -> Timing:
    samples = [around_ms * rng.uniform(0.97, 1.05) for _ in range(rng.randint(3, 40))]
    return Timing.from_samples(samples)


def synthetic_report(rng: random.Random, tokens=(4096, 16384), skipped: str | None = None) -> BenchReport:
    """Random but plausible rows: dense fastest, then tuned, default, grouped_mm; one problem per
    token count tuned from a cache, the others on the default. ``skipped``: the experts block did
    not run, for this reason (else it has a transformers and a moe-tune row per token count)."""
    default = KernelConfig(128, 256, 64, 8, 8, 3, TMA_LOAD=True)
    tuned = KernelConfig(128, 128, 64, 8, 4, 4, TMA_LOAD=True)
    gemms = []
    for T in tokens:
        cached = rng.randrange(6)
        for i, problem in enumerate(QWEN3_30B.problems()):
            base = problem.flops(T) / 400e12 * 1e3  # ms at 400 TFLOP/s
            from_cache = i == cached
            timings = {"dense": random_timing(rng, base * 0.6), "tuned": random_timing(rng, base * 0.85),
                       "default": random_timing(rng, base * 0.95), "grouped_mm": random_timing(rng, base * 1.1)}
            if not from_cache:
                timings["tuned"] = timings["default"]
            gemms.append(GemmRow(
                tokens=T, problem=problem, tuned_config=tuned if from_cache else default,
                tuned_from=ConfigSource("user", "/cache/nvidia-h200__triton-3.6.0.json", T, "3.6.0") if from_cache
                else ConfigSource("default"),
                default_config=default, timings=timings,
                errors={"default": rng.uniform(1e-4, 5e-3), "tuned": rng.uniform(1e-4, 5e-3)}, tolerance=2e-2))
    if skipped is None:
        rows = []
        for T in tokens:
            ms = T / 4096 * 5.29
            rows.append(BlockRow(T, BLOCK_BASELINE, random_timing(rng, ms / 3), random_timing(rng, ms),
                                 peak_mib=rng.uniform(1000, 9000)))
            rows.append(BlockRow(T, "moe_tune", random_timing(rng, ms / 6), random_timing(rng, ms / 2.2),
                                 peak_mib=rng.uniform(1000, 9000),
                                 errors={"out": rng.uniform(1e-4, 1e-2), "hidden": rng.uniform(1e-4, 1e-2)},
                                 tolerance=5e-2))
        section = BlockSection(rows=tuple(rows), family="qwen3_moe")
    else:
        section = BlockSection(skipped=skipped)
    return BenchReport(environment=dict(ENVIRONMENT), model="qwen3-30b-a3b", shape=QWEN3_30B, dtype="bfloat16",
                       tokens=tuple(tokens), settings={"timer": "triton.testing.do_bench", "warmup_ms": 25,
                                                       "rep_ms": 100, "seed": 0, "routing": "random"},
                       gemms=tuple(gemms), block=section)

