"""The last word of a bucket's settle: the careful winner against the heuristic default, head to head.

Without a cache entry the runtime runs the heuristic default (``moe_tune.space.default_config``),
so a tuned config earns its place only by beating that default where a user would measure it.
Careful medians taken apart in time differ by a few percent (clocks, heat): the benchmark once
timed 2 of 12 cached picks 4-10% slower than the default, where the sweep had timed them 2-5%
faster (issue 14). So the two are timed again in one worker, on one case, in interleaved rounds,
and the default stays unless the challenger is faster beyond the noise of those very samples.

Data flow:

1. in a worker, ``head_to_head(runs, timer, rounds)``: each round times every run once, the
   order alternating (A B, B A, …) so a drift in time favours neither; each run's samples are
   pooled over the rounds (``candidate.Bench.versus`` turns them into one ``Outcome`` each);
2. in the sweep, ``decide(challenger, default, versus)`` → a ``Decision``: the challenger wins
   only when its median is below the default's by more than the margin, the larger p20–p80
   half-spread of the two, and at least ``NOISE_FLOOR`` of the default's median. The decision
   goes into the bucket's result (the journal, the sweep's JSON report).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from moe_tune.problem import KernelConfig
# The rounds themselves are the timer's one rule, which the bench's comparison uses too.
from moe_tune.timer import interleaved as head_to_head  # noqa: F401  (re-exported)
from moe_tune.tuning.protocol import Versus

# The smallest lead that replaces the default whatever the spreads say: timings of one kernel in
# two processes differ by more (3-5% on an H100, see tuning/verify.py), so a smaller lead would not
# survive the user's own measurement.
NOISE_FLOOR = 0.01


@dataclass(frozen=True)
class Decision:
    challenger: KernelConfig
    default: KernelConfig
    challenger_ms: float | None  # median over the rounds; None when it failed
    default_ms: float | None
    margin_ms: float | None  # how far below the default the challenger had to be
    kept: str  # "challenger" or "default"
    reason: str

    @property
    def winner(self) -> KernelConfig:
        return self.challenger if self.kept == "challenger" else self.default

    def to_dict(self) -> dict[str, Any]:
        return {"challenger": self.challenger.to_dict(), "challenger_short": self.challenger.short(),
                "default_short": self.default.short(), "challenger_ms": self.challenger_ms,
                "default_ms": self.default_ms, "margin_ms": self.margin_ms, "kept": self.kept, "reason": self.reason}

    @classmethod
    def from_dict(cls, default: KernelConfig, data: Mapping[str, Any]) -> "Decision":
        return cls(KernelConfig.from_dict(data["challenger"]), default, data.get("challenger_ms"),
                   data.get("default_ms"), data.get("margin_ms"), data["kept"], data.get("reason", ""))


def decide(challenger: KernelConfig, default: KernelConfig, versus: Versus, *,
           noise_floor: float = NOISE_FLOOR) -> Decision:
    """Keep the default unless ``challenger`` beat it beyond the noise (module docstring)."""
    a, b = versus.challenger, versus.default
    a_ms = a.median_ms if a.ok else None
    b_ms = b.median_ms if b.ok else None
    if a_ms is None:
        return Decision(challenger, default, None, b_ms, None, "default",
                        f"the challenger failed head to head: {a.error or 'failed'}")
    if b_ms is None:
        return Decision(challenger, default, a_ms, None, None, "challenger",
                        f"the default failed head to head: {b.error or 'failed'}")
    margin = max((a.spread_ms or 0.0) / 2, (b.spread_ms or 0.0) / 2, noise_floor * b_ms)
    if a_ms < b_ms - margin:
        return Decision(challenger, default, a_ms, b_ms, margin, "challenger",
                        f"{a_ms:.4g} ms < {b_ms:.4g} ms by more than the noise ({margin:.2g} ms)")
    return Decision(challenger, default, a_ms, b_ms, margin, "default",
                    f"{a_ms:.4g} ms vs {b_ms:.4g} ms: within the noise ({margin:.2g} ms)")
