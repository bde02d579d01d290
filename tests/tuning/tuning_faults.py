"""Candidates that misbehave, for the worker and sweep tests: a ``candidate.Bench`` subclass that
makes named configs crash the worker, hang, raise, or compute a wrong result. Workers build it in
their own process (``WorkerProcess(bench=faulty({...}))``), so it lives in a module they can import
(pytest puts this folder on ``sys.path``; spawned workers inherit it).
"""

from __future__ import annotations

import functools
import os
import time
from typing import Mapping

from moe_tune.tuning.candidate import Bench

KINDS = ("corrupt", "raise", "crash", "hang")


class FaultyBench(Bench):
    """``faults``: config ``short()`` → one of ``KINDS``."""

    def __init__(self, faults: Mapping[str, str]):
        super().__init__()
        assert set(faults.values()) <= set(KINDS), faults
        self.faults = dict(faults)

    def handle(self, request):
        if "config" in request:
            fault = self.faults.get(_short(request["config"]))
            if fault == "crash":
                os._exit(70)  # what a segfault in the driver looks like from the parent: EOF, no reply
            if fault == "hang":
                time.sleep(10**6)
        return super().handle(request)

    def launch(self, case, cfg, out=None):
        fault = self.faults.get(cfg.short())
        if fault == "raise":
            raise RuntimeError(f"injected fault for {cfg.short()}")
        result = super().launch(case, cfg, out)
        return result * 1.25 if fault == "corrupt" else result


def faulty(faults: Mapping[str, str]):
    """A picklable factory of ``FaultyBench(faults)`` for ``WorkerProcess(bench=...)``."""
    return functools.partial(FaultyBench, dict(faults))


def _short(config: Mapping) -> str:
    from moe_tune.problem import KernelConfig

    return KernelConfig.from_dict(config).short()
