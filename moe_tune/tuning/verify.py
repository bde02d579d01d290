"""``moe-tune verify``'s engine: re-time a sample of cached entries on this device.

Data flow: the cache layers (``cache.paths.search_layers``) → this device's cache files (matched
on name and compute capability) → every (problem, bucket, config) they hold → a seeded sample →
each config and the heuristic default gated and timed carefully in the same worker process
(``engine.Engine``, same inputs as the sweep builds) → one ``Verdict`` each. An entry is stale when
its config now fails the gate, runs slower than recorded by more than ``tolerance``, or slower
than the default by more than ``default_margin``: a driver, Triton or kernel change has moved the
optimum and the problem needs a new sweep.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

from moe_tune.device import DeviceInfo
from moe_tune.problem import KernelConfig, Problem
from moe_tune.space import default_config
from moe_tune.tuning.routing_spec import RoutingSpec

# Timings of the same kernel in two processes on one H100 differ by up to ~3-5% (clocks, L2
# state); 10% is a real change.
DEFAULT_TOLERANCE = 0.10
DEFAULT_MARGIN = 0.03


@dataclass
class Verdict:
    source: str
    problem: Problem
    tokens: int
    config: KernelConfig
    recorded_ms: float
    now_ms: float | None
    default_ms: float | None
    status: str  # ok | slower-than-recorded | slower-than-default | wrong | failed
    detail: str = ""

    @property
    def stale(self) -> bool:
        return self.status != "ok"

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "problem": self.problem.key, "tokens": self.tokens,
                "config": self.config.to_dict(), "config_short": self.config.short(),
                "recorded_ms": self.recorded_ms, "now_ms": self.now_ms, "default_ms": self.default_ms,
                "status": self.status, "stale": self.stale, "detail": self.detail}


def cached_entries(device: DeviceInfo, cache_dir=None) -> list[tuple[str, Problem, int, Any]]:
    """(file, problem, tokens, ``BucketEntry``) of every cache file for ``device`` in every layer."""
    from moe_tune.cache import paths
    from moe_tune.cache.store import read_cache_file

    entries = []
    for layer in paths.search_layers(cache_dir):
        for source in layer.cache_files(device.name):
            cache = read_cache_file(source)
            if cache.device.capability != device.capability:
                continue
            for problem in cache.problems():
                for tokens, entry in sorted(cache.entries[problem].items()):
                    entries.append((f"{layer.name}:{source}", problem, tokens, entry))
    return entries


def judge(recorded_ms: float, now, default, *, tolerance: float, default_margin: float) -> tuple[str, str]:
    """(status, detail) of one entry from its new outcome and the default's."""
    if not now.ok:
        kind = "wrong" if (now.error or "").startswith("wrong result") else "failed"
        return kind, now.error or "failed"
    if now.median_ms > recorded_ms * (1 + tolerance):
        return "slower-than-recorded", f"{now.median_ms:.4g} ms now vs {recorded_ms:.4g} ms recorded"
    if default is not None and default.ok and now.median_ms > default.median_ms * (1 + default_margin):
        return "slower-than-default", f"{now.median_ms:.4g} ms vs the default's {default.median_ms:.4g} ms"
    return "ok", ""


def verify(device: DeviceInfo, entries, evaluator, *, sample: int, seed: int = 0,
           tolerance: float = DEFAULT_TOLERANCE, default_margin: float = DEFAULT_MARGIN,
           on_entry: Callable[[], None] | None = None) -> list[Verdict]:
    """Re-time ``sample`` of ``entries`` (all when fewer) with ``evaluator`` (``engine.Engine``)."""
    chosen = entries if len(entries) <= sample else random.Random(seed).sample(entries, sample)
    verdicts = []
    for source, problem, tokens, entry in chosen:
        now = evaluator.measure(problem, tokens, entry.config, "careful")
        default = evaluator.measure(problem, tokens, default_config(problem, device), "careful")
        status, detail = judge(entry.measurement.median_ms, now, default, tolerance=tolerance,
                               default_margin=default_margin)
        verdicts.append(Verdict(source, problem, tokens, entry.config, entry.measurement.median_ms,
                                now.median_ms if now.ok else None, default.median_ms if default.ok else None,
                                status, detail))
        if on_entry:
            on_entry()
    return verdicts


def run_verify(*, cache_dir=None, sample: int = 8, seed: int = 0, tolerance: float = DEFAULT_TOLERANCE,
               default_margin: float = DEFAULT_MARGIN, interpret: bool = False,
               candidate_timeout_s: float = 120.0, on_entry: Callable[[], None] | None = None
               ) -> tuple[DeviceInfo, int, list[Verdict]]:
    """(device, entries found, verdicts) for this device's cached entries."""
    from moe_tune.tuning.devices import detect_device
    from moe_tune.tuning.engine import Engine

    device = detect_device(interpret)
    entries = cached_entries(device, cache_dir)
    if not entries:
        return device, 0, []
    buckets = tuple(sorted({t for _, _, t, _ in entries}))
    with Engine(device, routing=RoutingSpec(), seed=seed, buckets=buckets,
                candidate_timeout_s=candidate_timeout_s) as engine:
        verdicts = verify(device, entries, engine, sample=sample, seed=seed, tolerance=tolerance,
                          default_margin=default_margin, on_entry=on_entry)
    return device, len(entries), verdicts
