"""What the sweep and its worker processes say to each other: plain dicts over a pipe.

Requests (built here, read by ``candidate.Bench.handle``):

* ``measure`` — gate one config on one (problem, token bucket) and time it for a stage
  (``screen``, ``careful``, ``tie1``…);
* ``versus`` — time a challenger and the heuristic default in interleaved rounds (``versus``);
* ``compile`` — build a config's kernels into Triton's on-disk cache without launching them;
* ``ping``.

Replies: a measurement is an ``Outcome`` (``to_dict``); a head-to-head is a ``Versus`` (two
``Outcome``s); a compile is ``{"ok", "seconds", "error"?}``. Any reply may be a plain failure
``{"ok": False, "error", "failure"?}`` instead (the worker died, hung or could not read the
request: ``workers.WorkerProcess``). The journal stores outcomes in the same form, so a resumed
sweep reads back exactly what the worker said.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

from moe_tune.problem import KernelConfig, Problem
from moe_tune.timer import Summary
from moe_tune.tuning.routing_spec import RoutingSpec


@dataclass(frozen=True)
class Outcome:
    """One measurement of one candidate: ``ok`` with a median, or not ``ok`` with the reason."""

    ok: bool
    median_ms: float | None = None
    spread_ms: float | None = None  # p80 − p20 of the samples
    samples: int = 0
    rel_error: float | None = None
    first_launch_ms: float | None = None  # gate launch incl. compile or load: shows precompile misses
    case_ms: float | None = None  # building the bucket's inputs and reference, when this request had to
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Outcome":
        names = {"ok", "median_ms", "spread_ms", "samples", "rel_error", "first_launch_ms", "case_ms", "error"}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def failed(cls, error: str, **extra: Any) -> "Outcome":
        return cls(ok=False, error=error, **extra)

    @classmethod
    def timed(cls, summary: Summary, **extra: Any) -> "Outcome":
        return cls(ok=True, median_ms=summary.median_ms, spread_ms=summary.spread_ms, samples=summary.n, **extra)


@dataclass(frozen=True)
class Versus:
    """A head-to-head: the challenger's and the default's samples of every round, each pooled."""

    challenger: Outcome
    default: Outcome

    def to_dict(self) -> dict[str, Any]:
        return {"ok": True, "challenger": self.challenger.to_dict(), "default": self.default.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Versus":
        """A worker's reply; a plain failure (the worker died or hung mid-way) fails both."""
        if "challenger" not in data:
            failed = Outcome.failed(data.get("error") or "failed")
            return cls(failed, failed)
        return cls(Outcome.from_dict(data["challenger"]), Outcome.from_dict(data["default"]))


def _routing(spec: RoutingSpec) -> dict[str, Any]:
    return {"kind": spec.kind, "skew": spec.skew, "path": spec.path}


def measure_request(problem: Problem, tokens: int, routing: RoutingSpec, seed: int, cfg: KernelConfig,
                    stage: str) -> dict[str, Any]:
    return {"op": "measure", "problem": problem.to_dict(), "tokens": tokens, "routing": _routing(routing),
            "seed": seed, "config": cfg.to_dict(), "stage": stage}


def versus_request(problem: Problem, tokens: int, routing: RoutingSpec, seed: int, challenger: KernelConfig,
                   default: KernelConfig, rounds: int) -> dict[str, Any]:
    return {"op": "versus", "problem": problem.to_dict(), "tokens": tokens, "routing": _routing(routing),
            "seed": seed, "config": challenger.to_dict(), "default": default.to_dict(), "rounds": rounds}


def compile_request(problem: Problem, cfg: KernelConfig, buckets: tuple[int, ...]) -> dict[str, Any]:
    return {"op": "compile", "problem": problem.to_dict(), "config": cfg.to_dict(), "tokens": list(buckets)}
