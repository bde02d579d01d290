"""Test helpers for the sweep engine: a deterministic timer that stands in for the GPU.

``HashTimer`` is what the tests pass as ``run_sweep(timer=...)``: a config's time is a hash of
(salt, problem, tokens, config) in [1, 2) ms, the same in every process, every stage and every
run, so a sweep split over lanes, ranks or shards must pick exactly the winners of a one-lane
sweep. ``delay_s`` makes each measurement take real time (a rank that can be killed mid-way).
It is picklable (torch.multiprocessing hands it to spawned ranks).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

from moe_tune.problem import KernelConfig, Problem
from moe_tune.tuning.protocol import Outcome


@dataclass(frozen=True)
class HashTimer:
    salt: int = 0
    delay_s: float = 0.0

    def true_ms(self, problem: Problem, tokens: int, cfg: KernelConfig) -> float:
        digest = hashlib.sha256(f"{self.salt}/{problem.key}/{tokens}/{cfg.short()}".encode()).digest()
        return 1.0 + int.from_bytes(digest[:4], "little") / 2**32

    def __call__(self, problem: Problem, tokens: int, cfg: KernelConfig, stage: str) -> Outcome:
        if self.delay_s:
            time.sleep(self.delay_s)
        return Outcome(ok=True, median_ms=self.true_ms(problem, tokens, cfg), spread_ms=0.01, samples=1,
                       rel_error=1e-3)
