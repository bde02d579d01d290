"""What a sweep reports: ``SweepReport`` — per problem its buckets' results (winner, times, the head
to head against the default), whether the sweep completed or why it stopped, where the cache and
the journal are, how the work was split and what the engine counted. The CLI prints it as a table
or, with ``--json``, as ``to_dict``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moe_tune.device import DeviceInfo
from moe_tune.models import ModelSpec
from moe_tune.problem import Problem
from moe_tune.tuning.engine import EngineStats
from moe_tune.tuning.options import SweepOptions, named_problems
from moe_tune.tuning.results import BucketResult


@dataclass
class SweepReport:
    model: ModelSpec
    device: DeviceInfo
    options: SweepOptions
    results: dict[Problem, list[BucketResult]]
    complete: bool
    elapsed_s: float
    stats: EngineStats
    cache_path: str | None
    journal_path: str
    stopped: str | None = None  # why the sweep stopped early
    split: dict[str, Any] = field(default_factory=lambda: {"kind": "all", "index": 0, "count": 1})
    lanes: tuple[str, ...] = ()
    units: list[dict[str, Any]] = field(default_factory=list)  # per problem: cost estimate, who ran it
    balance_bound: float | None = None

    @property
    def rank(self) -> int | None:
        """This process's torchrun rank (None outside torchrun)."""
        return self.split["index"] if self.split["kind"] == "torchrun" else None

    @property
    def failed_buckets(self) -> list[BucketResult]:
        return [b for buckets in self.results.values() for b in buckets if not b.ok]

    def to_dict(self) -> dict[str, Any]:
        shape = self.model.shape
        names = {problem: name for name, problem in named_problems(self.options).items()}
        return {
            "model": self.model.name,
            "shape": {"E": shape.E, "H": shape.H, "I": shape.I, "topk": shape.topk},
            "device": self.device.to_dict(),
            "dtype": self.options.dtype,
            "routing": str(self.options.routing),
            "space": self.options.space,
            "exhaustive": self.options.exhaustive,
            "policy": self.options.policy.to_dict(),
            "tokens": list(self.options.tokens),
            "complete": self.complete,
            "stopped": self.stopped,
            "elapsed_s": round(self.elapsed_s, 3),
            "stats": self.stats.to_dict(),
            "cache_path": self.cache_path,
            "journal_path": self.journal_path,
            "split": self.split,
            "lanes": list(self.lanes),
            "units": self.units,
            "balance_bound": round(self.balance_bound, 3) if self.balance_bound is not None else None,
            "problems": [
                {"problem": p.key, "name": names.get(p, p.key), "gemm": p.gemm, "pass": p.pass_,
                 "buckets": [b.to_dict() for b in buckets]}
                for p, buckets in self.results.items()
            ],
        }
