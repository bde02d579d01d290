"""Synthetic benchmark reports for tests: random but plausible rows of every section, no GPU and
no torch needed.

Each call draws fresh values from the ``random.Random`` it is given (seeded per test run), like
``moe_tune.cache.testing``.
"""

from __future__ import annotations

import random

from moe_tune.bench.results import (BLOCK_BASELINE, BLOCK_IMPLEMENTATIONS, GROUPED_MM_COMPILED, NOT_REQUESTED,
                                    STEP_IMPLEMENTATIONS, STEP_MODES, BlockRow, BlockSection, ConfigSource, GemmRow,
                                    HostRow, HostSection, StepRow, StepSection, Timing)
from moe_tune.bench.run_report import BenchReport
from moe_tune.problem import KernelConfig, MoeShape

QWEN3_30B = MoeShape(E=128, H=2048, I=768, topk=8)

ENVIRONMENT = {"card": "NVIDIA H200", "driver": "580.159.04", "torch": "2.11.0+cu130", "triton": "3.6.0",
               "cuda": "13.0", "transformers": "5.17.0", "moe_tune": "0.1.0", "python": "3.12.3",
               "date": "2026-11-27"}


def random_timing(rng: random.Random, around_ms: float) -> Timing:
    samples = [around_ms * rng.uniform(0.97, 1.05) for _ in range(rng.randint(3, 40))]
    return Timing.from_samples(samples)


STEP_MODEL = {"family": "qwen3_moe", "config": "Qwen3MoeConfig", "layers": 2, "hidden": 2048, "heads": 32,
              "kv_heads": 4, "head_dim": 64, "vocab": 16384, "seq_len": 2048, "attention": "sdpa", "lora_rank": 16,
              "optimizer": "torch.optim.AdamW (lr 1e-5, torch's defaults otherwise)",
              "flop_share": {"experts": 0.55, "attention": 0.25, "router": 0.01, "lm_head": 0.19}}


def synthetic_report(rng: random.Random, tokens=(4096, 16384), skipped: str | None = None,
                     compiled: bool = False, steps: bool = False) -> BenchReport:
    """Random but plausible rows: dense fastest, then tuned, default, grouped_mm; one problem per
    token count tuned from a cache, the others on the default. ``skipped``: the experts block and
    its host overhead did not run, for this reason (else a grouped_mm and a moe-tune row per token
    count). ``compiled``: also the compiled grouped_mm GEMM column and compiled block and host rows.
    ``steps``: a training-step section (every mode, eager and compiled when ``compiled``)."""
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
            if compiled:
                timings[GROUPED_MM_COMPILED] = random_timing(rng, base * rng.uniform(0.7, 1.0))
            gemms.append(GemmRow(
                tokens=T, problem=problem, tuned_config=tuned if from_cache else default,
                tuned_from=ConfigSource("user", "/cache/nvidia-h200__triton-3.6.0.json", T, "3.6.0") if from_cache
                else ConfigSource("default"),
                default_config=default, timings=timings,
                errors={"default": rng.uniform(1e-4, 5e-3), "tuned": rng.uniform(1e-4, 5e-3)}, tolerance=2e-2))
    labels = BLOCK_IMPLEMENTATIONS if compiled else (BLOCK_BASELINE, "moe_tune")
    if skipped is None:
        rows = []
        for T in tokens:
            ms = T / 4096 * 5.29
            for label in labels:
                scale = 1.0 if label == BLOCK_BASELINE else rng.uniform(0.5, 0.7)
                errors = {} if label == BLOCK_BASELINE else {"out": rng.uniform(1e-4, 1e-2),
                                                             "hidden": rng.uniform(1e-4, 1e-2)}
                rows.append(BlockRow(T, label, random_timing(rng, ms / 3 * scale), random_timing(rng, ms * scale),
                                     peak_mib=rng.uniform(1000, 9000), errors=errors,
                                     tolerance=5e-2 if errors else None))
        section = BlockSection(rows=tuple(rows), family="qwen3_moe")
        host = HostSection(tokens=128, iterations=50, repeats=5, rows=tuple(
            HostRow(label, random_timing(rng, rng.uniform(1.0, 2.5)), random_timing(rng, 2.6),
                    kernels=rng.randint(10, 60), memops=rng.randint(0, 8)) for label in labels))
    else:
        section, host = BlockSection(skipped=skipped), HostSection(skipped=skipped)
    step = StepSection(skipped=NOT_REQUESTED)
    if steps:
        rows = []
        for T in tokens:
            loss = rng.uniform(9.6, 9.9)
            for mode in STEP_MODES:
                for is_compiled in ((False, True) if compiled else (False,)):
                    for impl in STEP_IMPLEMENTATIONS:
                        rows.append(StepRow(T, mode, impl, is_compiled, random_timing(rng, T / 4096 * 20),
                                            host=random_timing(rng, T / 4096 * 12), peak_mib=rng.uniform(2000, 9000),
                                            loss=loss * (1 + rng.uniform(-1e-4, 1e-4)),
                                            graphs=rng.randint(1, 3) if is_compiled else None))
        step = StepSection(rows=tuple(rows), model=dict(STEP_MODEL), loss_tolerance=5e-3)
    settings = {"timer": "triton.testing.do_bench", "warmup_ms": 25, "rep_ms": 100, "seed": 0, "routing": "random"}
    if compiled:
        settings["compile"] = {"backend": "inductor"}
    return BenchReport(environment=dict(ENVIRONMENT), model="qwen3-30b-a3b", shape=QWEN3_30B, dtype="bfloat16",
                       tokens=tuple(tokens), settings=settings, gemms=tuple(gemms), block=section, host=host, step=step)

