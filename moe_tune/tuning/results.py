"""What a bucket's search found (``BucketResult``), and how it reaches the cache file.

A ``BucketResult`` is journalled as soon as its bucket is settled (``to_dict``/``from_dict``: a
resumed sweep reads it back instead of searching again), goes into the sweep's report, and, once
every bucket of its problem is settled, ``write_results`` merges the problem's passing buckets
into the cache file (``cache.CacheStore``: locked, merged, provenance filled in). A bucket where
no config passed the gate is reported and never written.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from moe_tune.device import DeviceInfo
from moe_tune.problem import KernelConfig, Problem
from moe_tune.tuning.versus import Decision


@dataclass
class Timed:
    """A config's careful samples in one bucket (one median per careful or tie round)."""

    config: KernelConfig
    medians: list[float] = field(default_factory=list)
    spreads: list[float] = field(default_factory=list)
    rel_error: float | None = None

    @property
    def median_ms(self) -> float:
        return statistics.median(self.medians)

    @property
    def spread_ms(self) -> float:
        return max(self.spreads) if self.spreads else 0.0


@dataclass
class BucketResult:
    problem: Problem
    tokens: int
    winner: KernelConfig | None
    median_ms: float | None
    spread_ms: float | None
    rel_error: float | None
    default: KernelConfig
    default_ms: float | None
    screened: int
    timed: int  # distinct configs measured: the screen plus finalists from outside it
    failed: dict[str, str]  # config short → why
    careful: list[Timed]
    screen_ms: dict[KernelConfig, float] = field(default_factory=dict)
    # The careful winner against the default, head to head (None: the default won the careful
    # stage itself, or could not run); ``winner`` is what that decided.
    versus: Decision | None = None

    @property
    def ok(self) -> bool:
        return self.winner is not None

    @property
    def tflops(self) -> float | None:
        if self.median_ms is None or self.median_ms <= 0:
            return None
        return self.problem.flops(self.tokens) / (self.median_ms * 1e-3) / 1e12

    @property
    def speedup(self) -> float | None:
        if self.default_ms is None or not self.median_ms:
            return None
        return self.default_ms / self.median_ms

    def to_dict(self) -> dict:
        return {
            "problem": self.problem.key,
            "tokens": self.tokens,
            "winner": self.winner.to_dict() if self.winner else None,
            "winner_short": self.winner.short() if self.winner else None,
            "median_ms": self.median_ms,
            "spread_ms": self.spread_ms,
            "tflops": self.tflops,
            "rel_error": self.rel_error,
            "default": self.default.to_dict(),
            "default_ms": self.default_ms,
            "speedup": self.speedup,
            "screened": self.screened,
            "timed": self.timed,
            "failed": self.failed,
            "careful": [{"config": t.config.to_dict(), "short": t.config.short(), "median_ms": t.median_ms,
                         "spread_ms": t.spread_ms, "rounds": len(t.medians)} for t in self.careful],
            "versus": self.versus.to_dict() if self.versus is not None else None,
        }

    @classmethod
    def from_dict(cls, problem: Problem, data: dict) -> "BucketResult":
        careful = [Timed(KernelConfig.from_dict(c["config"]), [c["median_ms"]], [c["spread_ms"]])
                   for c in data.get("careful", [])]
        default = KernelConfig.from_dict(data["default"])
        return cls(
            problem=problem,
            tokens=data["tokens"],
            winner=KernelConfig.from_dict(data["winner"]) if data.get("winner") else None,
            median_ms=data.get("median_ms"),
            spread_ms=data.get("spread_ms"),
            rel_error=data.get("rel_error"),
            default=default,
            default_ms=data.get("default_ms"),
            screened=data.get("screened", 0),
            timed=data.get("timed", data.get("screened", 0)),
            failed=dict(data.get("failed", {})),
            careful=careful,
            versus=Decision.from_dict(default, data["versus"]) if data.get("versus") else None,
        )


def write_results(cache_dir: Path, device: DeviceInfo, problem: Problem, buckets: list[BucketResult],
                  elapsed_s: float, command: str | None = None) -> Path:
    """Merge one problem's passing buckets into the cache file (locked; see ``cache.store``)."""
    from moe_tune.cache import CacheFile, CacheStore, Measurement

    cache = CacheFile.new(device, command=command, sweep_seconds=elapsed_s)
    for b in buckets:
        if not b.ok:
            continue  # no config passed the gate: nothing trustworthy to write
        cache.add(problem, b.tokens, b.winner, Measurement(
            median_ms=b.median_ms,
            tflops=b.tflops or 0.0,
            default_ms=b.default_ms,
            candidates=b.timed,
            correct=True,
            spread_ms=b.spread_ms or 0.0,
            max_rel_err=b.rel_error if b.rel_error is not None and math.isfinite(b.rel_error) else None,
        ))
    return CacheStore(cache_dir).write(cache).path
