"""What ``moe-tune bench`` measured, as plain data: timings, one row per (token count, GEMM problem),
one row per (token count, experts-block implementation), and the report that holds them with the
environment they were measured in.

Pure Python (no torch): ``moe_tune.bench.report`` formats these and the tests build them by hand.
Every class has ``to_dict``/``from_dict``; derived figures (TFLOP/s, ratios) are written into the
JSON for readers of the file but are properties here, recomputed from the stored times, so a
report read back equals the one written.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from moe_tune.errors import InvalidInputError
from moe_tune.problem import KernelConfig, MoeShape, Problem

REPORT_KIND = "moe-tune-bench"
REPORT_VERSION = 1

# The four ways one GEMM problem is run, in table order.
GEMM_VARIANTS = ("tuned", "default", "grouped_mm", "dense")


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (what ``triton.testing`` reports)."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _failed_checks(errors: Mapping[str, float], tolerance: float | None) -> list[str]:
    """Names whose sanity-check error exceeds ``tolerance`` (NaN fails; no tolerance, no check)."""
    if tolerance is None:
        return []
    return [name for name, err in errors.items() if not err <= tolerance]


@dataclass(frozen=True)
class Timing:
    """Median and spread of repeated runs, in milliseconds: ``p20``–``p80`` is the middle 60% of
    the ``n`` samples."""

    ms: float
    p20: float
    p80: float
    min: float
    n: int

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float]) -> "Timing":
        if not samples_ms:
            raise InvalidInputError("a timing needs at least one sample")
        values = sorted(float(s) for s in samples_ms)
        return cls(ms=statistics.median(values), p20=_quantile(values, 0.2), p80=_quantile(values, 0.8),
                   min=values[0], n=len(values))

    def tflops(self, flops: int) -> float:
        return flops / (self.ms * 1e-3) / 1e12

    @property
    def spread(self) -> float:
        """Half the p20–p80 range relative to the median (0.02 reads as ±2%)."""
        return (self.p80 - self.p20) / 2 / self.ms if self.ms > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"ms": self.ms, "p20": self.p20, "p80": self.p80, "min": self.min, "n": self.n}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Timing":
        try:
            return cls(ms=float(data["ms"]), p20=float(data["p20"]), p80=float(data["p80"]),
                       min=float(data["min"]), n=int(data["n"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInputError(f"malformed timing record: {exc!r}") from None


@dataclass(frozen=True)
class ConfigSource:
    """Where the tuned config came from (``moe_tune.runtime.explain``): ``source`` is a cache layer
    (``explicit``, ``env``, ``user``, ``shipped``) or ``default`` when no cache has the problem."""

    source: str
    path: str | None = None
    bucket: int | None = None
    triton: str | None = None

    @property
    def from_cache(self) -> bool:
        return self.source != "default"

    def describe(self) -> str:
        if not self.from_cache:
            return "no cache: heuristic default"
        return f"{self.source} cache, bucket {self.bucket}" if self.bucket is not None else f"{self.source} cache"

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "path": self.path, "bucket": self.bucket, "triton": self.triton}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ConfigSource":
        return cls(source=str(data["source"]), path=data.get("path"), bucket=data.get("bucket"),
                   triton=data.get("triton"))


@dataclass(frozen=True)
class GemmRow:
    """One GEMM problem at one token count, run four ways: moe-tune with the tuned config and with
    the heuristic default, ``torch._grouped_mm`` with the permutes that layout needs, and one dense
    matmul of the same FLOPs. ``errors``: relative difference of each moe-tune run's output from
    ``torch._grouped_mm``'s (a sanity check that both compute the same thing)."""

    tokens: int
    problem: Problem
    tuned_config: KernelConfig
    tuned_from: ConfigSource
    default_config: KernelConfig
    timings: Mapping[str, Timing]  # GEMM_VARIANTS → Timing
    errors: Mapping[str, float] = field(default_factory=dict)  # "tuned"/"default" → relative difference
    tolerance: float | None = None

    def __post_init__(self) -> None:
        missing = [v for v in GEMM_VARIANTS if v not in self.timings]
        if missing:
            raise InvalidInputError(f"a GEMM row needs timings for {', '.join(missing)}")

    @property
    def flops(self) -> int:
        return self.problem.flops(self.tokens)

    def tflops(self, variant: str) -> float:
        return self.timings[variant].tflops(self.flops)

    def speedup(self, variant: str, baseline: str) -> float:
        """How many times faster ``variant`` runs than ``baseline`` (>1: faster)."""
        return self.timings[baseline].ms / self.timings[variant].ms

    @property
    def tuned_is_default(self) -> bool:
        return self.tuned_config == self.default_config

    @property
    def failed_checks(self) -> list[str]:
        return _failed_checks(self.errors, self.tolerance)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "gemm": self.problem.gemm,
            "pass": self.problem.pass_,
            "problem": self.problem.to_dict(),
            "key": self.problem.key,
            "flops": self.flops,
            "tuned_config": self.tuned_config.to_dict(),
            "tuned_from": self.tuned_from.to_dict(),
            "default_config": self.default_config.to_dict(),
            "timings": {v: self.timings[v].to_dict() for v in GEMM_VARIANTS},
            "tflops": {v: self.tflops(v) for v in GEMM_VARIANTS},
            "tuned_vs_grouped_mm": self.speedup("tuned", "grouped_mm"),
            "tuned_vs_default": self.speedup("tuned", "default"),
            "default_vs_grouped_mm": self.speedup("default", "grouped_mm"),
            "tuned_fraction_of_dense": self.speedup("tuned", "dense"),
            "errors": dict(self.errors),
            "tolerance": self.tolerance,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "GemmRow":
        try:
            return cls(
                tokens=int(data["tokens"]),
                problem=Problem.from_dict(data["problem"]),
                tuned_config=KernelConfig.from_dict(data["tuned_config"]),
                tuned_from=ConfigSource.from_dict(data["tuned_from"]),
                default_config=KernelConfig.from_dict(data["default_config"]),
                timings={v: Timing.from_dict(t) for v, t in data["timings"].items()},
                errors={k: float(v) for k, v in data.get("errors", {}).items()},
                tolerance=data.get("tolerance"),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise InvalidInputError(f"malformed GEMM row: {exc!r}") from None


# Experts-block implementations, in table order: transformers' own, then moe-tune's.
BLOCK_BASELINE = "grouped_mm"


@dataclass(frozen=True)
class BlockRow:
    """The experts block at one token count under one implementation: a training forward
    (autograd recording) and forward+backward, the peak memory one fwd+bwd adds (CUDA only), and
    the relative difference of its output and gradients from the baseline's."""

    tokens: int
    implementation: str  # "grouped_mm" (transformers), "moe_tune", "moe_tune+compile"
    fwd: Timing
    fwd_bwd: Timing
    peak_mib: float | None = None
    errors: Mapping[str, float] = field(default_factory=dict)
    tolerance: float | None = None

    @property
    def failed_checks(self) -> list[str]:
        return _failed_checks(self.errors, self.tolerance)

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "implementation": self.implementation, "fwd": self.fwd.to_dict(),
                "fwd_bwd": self.fwd_bwd.to_dict(), "peak_mib": self.peak_mib, "errors": dict(self.errors),
                "tolerance": self.tolerance}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "BlockRow":
        try:
            return cls(tokens=int(data["tokens"]), implementation=str(data["implementation"]),
                       fwd=Timing.from_dict(data["fwd"]), fwd_bwd=Timing.from_dict(data["fwd_bwd"]),
                       peak_mib=data.get("peak_mib"), errors={k: float(v) for k, v in data.get("errors", {}).items()},
                       tolerance=data.get("tolerance"))
        except (KeyError, TypeError, AttributeError) as exc:
            raise InvalidInputError(f"malformed experts-block row: {exc!r}") from None


@dataclass(frozen=True)
class BlockSection:
    """The experts-block comparison, or why it did not run (``skipped``)."""

    rows: tuple[BlockRow, ...] = ()
    skipped: str | None = None
    family: str | None = None  # the transformers model family the block was built from

    def baseline(self, tokens: int) -> BlockRow | None:
        return next((r for r in self.rows if r.tokens == tokens and r.implementation == BLOCK_BASELINE), None)

    def speedup(self, row: BlockRow, which: str) -> float | None:
        """Baseline time / ``row``'s time for ``which`` in ``fwd``/``fwd_bwd`` (None without a baseline)."""
        base = self.baseline(row.tokens)
        if base is None:
            return None
        return getattr(base, which).ms / getattr(row, which).ms

    def to_dict(self) -> dict[str, Any]:
        rows = []
        for r in self.rows:
            item = r.to_dict()
            if r.implementation != BLOCK_BASELINE:
                item["fwd_vs_grouped_mm"] = self.speedup(r, "fwd")
                item["fwd_bwd_vs_grouped_mm"] = self.speedup(r, "fwd_bwd")
            rows.append(item)
        return {"skipped": self.skipped, "family": self.family, "rows": rows}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "BlockSection":
        return cls(rows=tuple(BlockRow.from_dict(r) for r in data.get("rows", ())), skipped=data.get("skipped"),
                   family=data.get("family"))


@dataclass(frozen=True)
class BenchReport:
    """Everything one ``moe-tune bench`` run measured, with the environment it ran in."""

    environment: Mapping[str, Any]
    model: str
    shape: MoeShape
    dtype: str
    tokens: tuple[int, ...]
    settings: Mapping[str, Any]  # timer (warmup/rep ms or wall clock), seed, routing
    gemms: tuple[GemmRow, ...]
    block: BlockSection

    @property
    def failed_checks(self) -> list[str]:
        """Every run whose output disagreed with its baseline, as ``T=.. gemm pass variant``."""
        failed = [f"T={r.tokens} {r.problem.gemm} {r.problem.pass_} ({name} config)"
                  for r in self.gemms for name in r.failed_checks]
        failed += [f"T={r.tokens} experts block {r.implementation} ({name})"
                   for r in self.block.rows for name in r.failed_checks]
        return failed

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": REPORT_KIND,
            "version": REPORT_VERSION,
            "environment": dict(self.environment),
            "model": self.model,
            "shape": {"E": self.shape.E, "H": self.shape.H, "I": self.shape.I, "topk": self.shape.topk},
            "dtype": self.dtype,
            "tokens": list(self.tokens),
            "settings": dict(self.settings),
            "gemms": [r.to_dict() for r in self.gemms],
            "block": self.block.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "BenchReport":
        if not isinstance(data, Mapping) or data.get("kind") != REPORT_KIND:
            raise InvalidInputError("not a moe-tune bench report (no \"kind\": \"moe-tune-bench\")")
        if data.get("version") != REPORT_VERSION:
            raise InvalidInputError(f"bench report version {data.get('version')!r}; "
                                    f"this moe-tune reads {REPORT_VERSION}")
        try:
            return cls(
                environment=dict(data["environment"]),
                model=str(data["model"]),
                shape=MoeShape(**data["shape"]),
                dtype=str(data["dtype"]),
                tokens=tuple(int(t) for t in data["tokens"]),
                settings=dict(data.get("settings", {})),
                gemms=tuple(GemmRow.from_dict(r) for r in data["gemms"]),
                block=BlockSection.from_dict(data["block"]),
            )
        except (KeyError, TypeError) as exc:
            raise InvalidInputError(f"malformed bench report: {exc!r}") from None
