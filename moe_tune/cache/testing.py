"""Random, valid cache values for tests (this package's and the sweep engine's).

Each call draws fresh values from the ``random.Random`` it is given, so a test seeded per run
covers new problems, configs and timings every time while staying reproducible from its seed.
"""

from __future__ import annotations

import random

from moe_tune.cache.schema import CacheFile, Measurement
from moe_tune.cache.software import Software
from moe_tune.device import DeviceInfo
from moe_tune.problem import DTYPES, PASSES, KernelConfig, Problem

H100 = DeviceInfo("NVIDIA H100 80GB HBM3", (9, 0), sm_count=132, max_shared_mem=232448)


def random_software(rng: random.Random, triton: str = "3.6.0") -> Software:
    return Software(triton=triton, torch=f"2.{rng.randint(6, 13)}.0", cuda=rng.choice(["12.8", "13.0", None]),
                    moe_tune="0.1.0", kernel_hash=f"{rng.getrandbits(64):016x}")


def random_problem(rng: random.Random) -> Problem:
    gather = rng.random() < 0.5
    return Problem(rng.choice(PASSES), rng.choice([8, 32, 64, 128, 256]), 64 * rng.randint(1, 64),
                   64 * rng.randint(1, 64), rng.choice([1, 2, 4, 8]), rng.choice(DTYPES),
                   gather=gather, scatter=not gather, weighted=not gather and rng.random() < 0.5)


def random_config(rng: random.Random) -> KernelConfig:
    return KernelConfig(BLOCK_M=rng.choice([16, 32, 64, 128]), BLOCK_N=rng.choice([32, 64, 128, 256]),
                        BLOCK_K=rng.choice([32, 64, 128]), GROUP_M=rng.choice([1, 4, 8]),
                        num_warps=rng.choice([4, 8]), num_stages=rng.randint(1, 5),
                        TMA_LOAD=rng.random() < 0.5, TMA_STORE=False)


def random_measurement(rng: random.Random, correct: bool = True) -> Measurement:
    median = rng.uniform(0.01, 5.0)
    return Measurement(median_ms=median, tflops=rng.uniform(10, 900), default_ms=median * rng.uniform(1.0, 2.0),
                       candidates=rng.randint(1, 400), correct=correct, spread_ms=median * rng.uniform(0, 0.05),
                       max_rel_err=rng.uniform(0, 1e-2))


def random_cache_file(rng: random.Random, device: DeviceInfo = H100, software: Software | None = None,
                      problems: int = 3, buckets: int = 3) -> CacheFile:
    cache = CacheFile.new(device, software or random_software(rng), command="moe-tune sweep --test",
                          sweep_seconds=rng.uniform(1, 300))
    for _ in range(problems):
        problem = random_problem(rng)
        for tokens in rng.sample([1, 16, 128, 512, 1024, 4096, 8192, 16384, 65536], buckets):
            cache.add(problem, tokens, random_config(rng), random_measurement(rng))
    return cache
