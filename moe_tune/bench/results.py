"""What ``moe-tune bench`` measured, as plain data: timings, one row per (token count, GEMM problem),
one row per (token count, experts-block implementation), one per implementation for the host
overhead, one per (token count, training mode, implementation) for whole training steps, and the
sections that hold them (``moe_tune.bench.run_report`` holds the whole report).

A measurement that failed (a compile error, out of memory) is a row with ``error`` set and no
timings, so one failure never loses the rest of a run.

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
from moe_tune.problem import KernelConfig, Problem


# The four ways every GEMM problem is run, in table order.
GEMM_VARIANTS = ("tuned", "default", "grouped_mm", "dense")
# torch._grouped_mm with its permutes under torch.compile: timed when compiling is requested.
GROUPED_MM_COMPILED = "grouped_mm_compiled"
ALL_GEMM_VARIANTS = ("tuned", "default", "grouped_mm", GROUPED_MM_COMPILED, "dense")
GEMM_BASELINES = ("grouped_mm", GROUPED_MM_COMPILED)


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (what ``triton.testing`` reports)."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _opt_timing(data: Any) -> "Timing | None":
    return None if data is None else Timing.from_dict(data)


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
    """One GEMM problem at one token count, run four or five ways: moe-tune with the tuned config
    and with the heuristic default, ``torch._grouped_mm`` with the permutes that layout needs (eager,
    and under torch.compile when requested), and one dense matmul of the same FLOPs. ``errors``:
    relative difference of each moe-tune run's (and the compiled baseline's) output from eager
    ``torch._grouped_mm``'s (a sanity check that both compute the same thing). ``failures``: a
    variant that could not run (the compiled baseline failing to compile) and why."""

    tokens: int
    problem: Problem
    tuned_config: KernelConfig
    tuned_from: ConfigSource
    default_config: KernelConfig
    timings: Mapping[str, Timing]  # ALL_GEMM_VARIANTS → Timing (GEMM_VARIANTS always)
    errors: Mapping[str, float] = field(default_factory=dict)  # "tuned"/"default"/... → relative difference
    tolerance: float | None = None
    failures: Mapping[str, str] = field(default_factory=dict)  # variant → why it has no timing

    def __post_init__(self) -> None:
        missing = [v for v in GEMM_VARIANTS if v not in self.timings]
        if missing:
            raise InvalidInputError(f"a GEMM row needs timings for {', '.join(missing)}")

    @property
    def variants(self) -> tuple[str, ...]:
        """The variants timed, in table order."""
        return tuple(v for v in ALL_GEMM_VARIANTS if v in self.timings)

    @property
    def best_baseline(self) -> str:
        """The faster of eager and compiled ``torch._grouped_mm`` (eager when only it ran)."""
        return min((v for v in GEMM_BASELINES if v in self.timings), key=lambda v: self.timings[v].ms)

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
            "timings": {v: self.timings[v].to_dict() for v in self.variants},
            "tflops": {v: self.tflops(v) for v in self.variants},
            "best_grouped_mm": self.best_baseline,
            "tuned_vs_best_grouped_mm": self.speedup("tuned", self.best_baseline),
            "tuned_vs_grouped_mm": self.speedup("tuned", "grouped_mm"),
            "tuned_vs_default": self.speedup("tuned", "default"),
            "default_vs_grouped_mm": self.speedup("default", "grouped_mm"),
            "tuned_fraction_of_dense": self.speedup("tuned", "dense"),
            "errors": dict(self.errors),
            "tolerance": self.tolerance,
            "failures": dict(self.failures),
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
                failures={k: str(v) for k, v in data.get("failures", {}).items()},
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise InvalidInputError(f"malformed GEMM row: {exc!r}") from None


# Experts implementations, in table order: transformers' grouped_mm (eager, then compiled), then
# moe-tune's. Every row's output is checked against eager grouped_mm's; speed-ups are taken against
# the faster grouped_mm row, the best a user has without moe-tune.
BLOCK_BASELINE = "grouped_mm"
COMPILED = "+compile"
BLOCK_IMPLEMENTATIONS = (BLOCK_BASELINE, BLOCK_BASELINE + COMPILED, "moe_tune", "moe_tune" + COMPILED)


def is_baseline(implementation: str) -> bool:
    """A grouped_mm row or GEMM variant, eager or compiled: what a user has without moe-tune."""
    return implementation.startswith(BLOCK_BASELINE)


def _check_measured(what: str, error: str | None, *timings: "Timing | None") -> None:
    if error is None and any(t is None for t in timings):
        raise InvalidInputError(f"{what} needs its timings or an error")


@dataclass(frozen=True)
class BlockRow:
    """The experts block at one token count under one implementation: a training forward
    (autograd recording) and forward+backward, the peak memory one fwd+bwd adds (CUDA only), and
    the relative difference of its output and gradients from eager grouped_mm's. ``error``: why
    the row has no timings; ``note``: what the reader should know (a compile that fell back from
    ``fullgraph=True``)."""

    tokens: int
    implementation: str  # one of BLOCK_IMPLEMENTATIONS
    fwd: Timing | None
    fwd_bwd: Timing | None
    peak_mib: float | None = None
    errors: Mapping[str, float] = field(default_factory=dict)
    tolerance: float | None = None
    error: str | None = None
    note: str | None = None

    def __post_init__(self) -> None:
        _check_measured("an experts-block row", self.error, self.fwd, self.fwd_bwd)

    @property
    def failed_checks(self) -> list[str]:
        return _failed_checks(self.errors, self.tolerance)

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "implementation": self.implementation,
                "fwd": self.fwd.to_dict() if self.fwd else None,
                "fwd_bwd": self.fwd_bwd.to_dict() if self.fwd_bwd else None, "peak_mib": self.peak_mib,
                "errors": dict(self.errors), "tolerance": self.tolerance, "error": self.error, "note": self.note}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "BlockRow":
        try:
            return cls(tokens=int(data["tokens"]), implementation=str(data["implementation"]),
                       fwd=_opt_timing(data["fwd"]), fwd_bwd=_opt_timing(data["fwd_bwd"]),
                       peak_mib=data.get("peak_mib"), errors={k: float(v) for k, v in data.get("errors", {}).items()},
                       tolerance=data.get("tolerance"), error=data.get("error"), note=data.get("note"))
        except (KeyError, TypeError, AttributeError) as exc:
            raise InvalidInputError(f"malformed experts-block row: {exc!r}") from None


@dataclass(frozen=True)
class BlockSection:
    """The experts-block comparison, or why it did not run (``skipped``)."""

    rows: tuple[BlockRow, ...] = ()
    skipped: str | None = None
    family: str | None = None  # the transformers model family the block was built from

    def baseline(self, tokens: int) -> BlockRow | None:
        """The eager grouped_mm row: the reference of the sanity check."""
        return next((r for r in self.rows if r.tokens == tokens and r.implementation == BLOCK_BASELINE), None)

    def best_baseline(self, tokens: int, which: str) -> BlockRow | None:
        """The fastest grouped_mm row (eager or compiled) for ``which`` in ``fwd``/``fwd_bwd``."""
        rows = [r for r in self.rows
                if r.tokens == tokens and is_baseline(r.implementation) and getattr(r, which) is not None]
        return min(rows, key=lambda r: getattr(r, which).ms, default=None)

    def speedup(self, row: BlockRow, which: str) -> float | None:
        """Best grouped_mm time / ``row``'s time for ``which`` (None when either is missing)."""
        base = self.best_baseline(row.tokens, which)
        mine = getattr(row, which)
        if base is None or mine is None:
            return None
        return getattr(base, which).ms / mine.ms

    def to_dict(self) -> dict[str, Any]:
        rows = []
        for r in self.rows:
            item = r.to_dict()
            for which in ("fwd", "fwd_bwd"):
                best = self.best_baseline(r.tokens, which)
                item[f"best_grouped_mm_{which}"] = best.implementation if best else None
                item[f"{which}_vs_best_grouped_mm"] = self.speedup(r, which)
            rows.append(item)
        return {"skipped": self.skipped, "family": self.family, "rows": rows}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "BlockSection":
        return cls(rows=tuple(BlockRow.from_dict(r) for r in data.get("rows", ())), skipped=data.get("skipped"),
                   family=data.get("family"))


@dataclass(frozen=True)
class HostRow:
    """Host (CPU) cost of one experts-block forward+backward under one implementation, at a token
    count small enough that the GPU waits on the host. ``host``: ms per call from
    ``time.perf_counter`` around a loop of calls that never synchronises (one sample per repeat);
    ``wall``: ms per call until the GPU finished the loop (near ``host``: host-bound).
    ``kernels``/``memops``: GPU kernel launches and memcpy/memset operations per call, from
    torch.profiler's CUDA events (None off CUDA)."""

    implementation: str  # one of BLOCK_IMPLEMENTATIONS, or GRAPHED
    host: Timing | None
    wall: Timing | None
    kernels: int | None = None
    memops: int | None = None
    error: str | None = None
    note: str | None = None

    def __post_init__(self) -> None:
        _check_measured("a host-overhead row", self.error, self.host, self.wall)

    def to_dict(self) -> dict[str, Any]:
        return {"implementation": self.implementation, "host": self.host.to_dict() if self.host else None,
                "wall": self.wall.to_dict() if self.wall else None, "kernels": self.kernels, "memops": self.memops,
                "error": self.error, "note": self.note}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "HostRow":
        try:
            return cls(implementation=str(data["implementation"]), host=_opt_timing(data["host"]),
                       wall=_opt_timing(data["wall"]), kernels=data.get("kernels"), memops=data.get("memops"),
                       error=data.get("error"), note=data.get("note"))
        except (KeyError, TypeError, AttributeError) as exc:
            raise InvalidInputError(f"malformed host-overhead row: {exc!r}") from None


@dataclass(frozen=True)
class HostSection:
    """Host overhead of the experts block at ``tokens`` tokens, or why it did not run."""

    tokens: int | None = None
    iterations: int | None = None  # calls per timed loop
    repeats: int | None = None  # timed loops (samples)
    rows: tuple[HostRow, ...] = ()
    skipped: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "tokens": self.tokens, "iterations": self.iterations,
                "repeats": self.repeats, "rows": [r.to_dict() for r in self.rows]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "HostSection":
        return cls(tokens=data.get("tokens"), iterations=data.get("iterations"), repeats=data.get("repeats"),
                   rows=tuple(HostRow.from_dict(r) for r in data.get("rows", ())), skipped=data.get("skipped"))


# Training modes, in table order: every weight trained; expert weights frozen (no weight gradient
# for them, activations still backpropagate through the experts); LoRA adapters on the expert
# weights through PEFT's ``target_parameters`` (the base frozen).
STEP_MODES = ("full", "frozen", "lora")
STEP_IMPLEMENTATIONS = (BLOCK_BASELINE, "moe_tune")
# moe-tune eager with its opt-in CUDA graphs around the experts block (``moe_tune.ops.graphs``, what
# ``MOE_TUNE_CUDA_GRAPHS=1`` turns on): a row of the host section, and of the eager training steps
# in the modes whose experts block it graphs (on CUDA, Qwen3-layout families).
GRAPHED = "moe_tune+cuda_graphs"
GRAPHED_MODES = ("full", "frozen")


@dataclass(frozen=True)
class StepRow:
    """Whole training steps (forward, backward, AdamW step) of the causal LM at one token count,
    in one training mode, under one experts implementation, eager or compiled. ``step``: ms per
    step with the GPU synchronised at its end; ``host``: ms until the step's last launch returned
    (the host side); ``peak_mib``: peak memory of one step above what was allocated before its model
    copy (weights, gradients, optimizer state, activations); ``loss``: the first step's loss (same
    weights and data for every row of a (tokens, mode): they must agree); ``graphs``: graphs
    torch.compile made (1: no graph break); ``note``: how it was timed, where not as usual."""

    tokens: int
    mode: str  # one of STEP_MODES
    implementation: str  # one of STEP_IMPLEMENTATIONS, or GRAPHED (eager)
    compiled: bool
    step: Timing | None
    host: Timing | None = None
    peak_mib: float | None = None
    loss: float | None = None
    graphs: int | None = None
    error: str | None = None
    note: str | None = None

    def __post_init__(self) -> None:
        _check_measured("a training-step row", self.error, self.step)

    @property
    def label(self) -> str:
        return self.implementation + (COMPILED if self.compiled else "")

    @property
    def tokens_per_s(self) -> float | None:
        return None if self.step is None else self.tokens / (self.step.ms * 1e-3)

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "mode": self.mode, "implementation": self.implementation,
                "compiled": self.compiled, "step": self.step.to_dict() if self.step else None,
                "host": self.host.to_dict() if self.host else None, "peak_mib": self.peak_mib, "loss": self.loss,
                "graphs": self.graphs, "error": self.error, "note": self.note, "tokens_per_s": self.tokens_per_s}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "StepRow":
        try:
            return cls(tokens=int(data["tokens"]), mode=str(data["mode"]), implementation=str(data["implementation"]),
                       compiled=bool(data["compiled"]), step=_opt_timing(data["step"]), host=_opt_timing(data.get("host")),
                       peak_mib=data.get("peak_mib"), loss=data.get("loss"), graphs=data.get("graphs"),
                       error=data.get("error"), note=data.get("note"))
        except (KeyError, TypeError, AttributeError) as exc:
            raise InvalidInputError(f"malformed training-step row: {exc!r}") from None


@dataclass(frozen=True)
class StepSection:
    """Training steps of an N-layer causal LM, or why they did not run (``skipped``);
    ``mode_skipped``: a mode that did not run and why (LoRA without PEFT). ``model``: how the LM was
    built (family, layers, attention and vocabulary sizes, sequence length, LoRA rank, optimizer,
    the share of matmul FLOPs per part), for the report's caption."""

    rows: tuple[StepRow, ...] = ()
    skipped: str | None = None
    model: Mapping[str, Any] = field(default_factory=dict)
    mode_skipped: Mapping[str, str] = field(default_factory=dict)
    loss_tolerance: float | None = None  # relative; first-step losses further apart disagree

    def reference(self, tokens: int, mode: str) -> StepRow | None:
        """The row whose first-step loss the others are checked against: eager grouped_mm if it ran."""
        rows = [r for r in self.rows if r.tokens == tokens and r.mode == mode and r.loss is not None]
        rows.sort(key=lambda r: (r.implementation != BLOCK_BASELINE, r.compiled))
        return rows[0] if rows else None

    def loss_difference(self, row: StepRow) -> float | None:
        """|loss − reference loss| / |reference loss| (None without both; NaN stays NaN)."""
        ref = self.reference(row.tokens, row.mode)
        if ref is None or row.loss is None:
            return None
        denom = abs(ref.loss) or 1.0
        return abs(row.loss - ref.loss) / denom

    @property
    def failed_losses(self) -> list[StepRow]:
        if self.loss_tolerance is None:
            return []
        failed = []
        for r in self.rows:
            diff = self.loss_difference(r)
            if diff is not None and not diff <= self.loss_tolerance:
                failed.append(r)
        return failed

    def best_baseline(self, tokens: int, mode: str) -> StepRow | None:
        rows = [r for r in self.rows if r.tokens == tokens and r.mode == mode and is_baseline(r.implementation)
                and r.step is not None]
        return min(rows, key=lambda r: r.step.ms, default=None)

    def speedup(self, row: StepRow) -> float | None:
        """Best grouped_mm step time (eager or compiled) / ``row``'s."""
        base = self.best_baseline(row.tokens, row.mode)
        if base is None or row.step is None:
            return None
        return base.step.ms / row.step.ms

    def eager_speedup(self, row: StepRow) -> float | None:
        """Eager grouped_mm's step time / ``row``'s, for an eager row (what an eager training loop
        gains by switching the experts alone); None for a compiled row."""
        base = next((r for r in self.rows if r.tokens == row.tokens and r.mode == row.mode
                     and r.implementation == BLOCK_BASELINE and not r.compiled and r.step is not None), None)
        if base is None or row.step is None or row.compiled:
            return None
        return base.step.ms / row.step.ms

    def to_dict(self) -> dict[str, Any]:
        rows = []
        for r in self.rows:
            item = r.to_dict()
            best = self.best_baseline(r.tokens, r.mode)
            item["best_grouped_mm"] = best.label if best else None
            item["vs_best_grouped_mm"] = self.speedup(r)
            item["vs_grouped_mm_eager"] = self.eager_speedup(r)
            item["loss_difference"] = self.loss_difference(r)
            rows.append(item)
        return {"skipped": self.skipped, "model": dict(self.model), "mode_skipped": dict(self.mode_skipped),
                "loss_tolerance": self.loss_tolerance, "rows": rows}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "StepSection":
        return cls(rows=tuple(StepRow.from_dict(r) for r in data.get("rows", ())), skipped=data.get("skipped"),
                   model=dict(data.get("model", {})), mode_skipped=dict(data.get("mode_skipped", {})),
                   loss_tolerance=data.get("loss_tolerance"))


NOT_REQUESTED = "not requested"
