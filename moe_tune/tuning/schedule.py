"""Which lane does what next: one sweep's screen measurements and bucket settles over the lanes.

Work units, finest first:

* a screen measurement — one (problem, bucket, config) of the bucket's screen list; independent
  of everything else, so it runs on whichever lane is free (a bucket's screen is split into as
  many slices as lanes reach for it, down to one config);
* a settle — the careful and tie stages of one (problem, bucket) (``search.settle_bucket``), on one
  lane, so every careful time it compares comes from one card. It needs its bucket's whole screen
  and the settle of the problem's previous bucket (whose winner and runner-up it re-times as
  seeds): each problem's settles form a chain, the only ordering in a sweep.

Data flow: ``Scheduler(buckets, ...)`` holds one ``Bucket`` each; ``run(lanes)`` starts one thread
per lane, and each loops ``_next(lane)`` → run the unit → ``_done(...)`` until nothing is left.
``_next`` (under one condition variable) picks, in order:

1. a settle that is ready (screen finished, previous bucket settled), earliest bucket first: the
   chains are the sweep's critical path;
2. a screen config of the lane's current bucket whose kernel is compiled (the timing worker keeps
   a few recent buckets' inputs; staying on one avoids rebuilding them);
3. a compiled screen config of the highest-priority bucket, preferring buckets no lane holds;
4. otherwise it waits until a compile lands or another lane finishes something. (Claiming an
   uncompiled config instead made 3 of 4 lanes wait ~10 s on compiles queued behind others.)

Bucket priority is its order in ``buckets`` (the sweep passes them bucket-major: every problem's
smallest bucket first, so every chain starts early and none is left alone at the end). Which lane
ran what never changes a result: a screen outcome is a config's time wherever it was taken, and
a settle is the same function a one-lane sweep calls, so with a deterministic timer the winners
are the same bit for bit.

The first error (``BudgetExhausted``, a worker that cannot start) stops every lane from taking
new work; ``run`` raises it once the lanes are idle.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from moe_tune.problem import KernelConfig, Problem

# Lanes waiting for work poll at least this often (compile completions also wake them).
_POLL_S = 0.05


@dataclass(eq=False)
class Bucket:
    """One (problem, bucket) of the sweep and its progress."""

    problem: Problem
    tokens: int
    screen: list[KernelConfig]  # the bucket's whole screen list, in plan order
    settle_here: bool = True  # False: this process screens (part of) it, another settles it
    mine: list[KernelConfig] | None = None  # the screen configs this process measures (None: all)
    previous: "Bucket | None" = None  # the problem's previous bucket (its settle seeds this one)
    screened: dict[KernelConfig, Any] = field(default_factory=dict)  # config → outcome
    result: Any = None  # the settle's BucketResult
    _unclaimed: list[KernelConfig] = field(default_factory=list)
    _running: int = 0
    _settling: bool = False
    _holders: set = field(default_factory=set)

    def __post_init__(self) -> None:
        todo = self.screen if self.mine is None else self.mine
        self._unclaimed = [c for c in todo if c not in self.screened]

    @property
    def todo(self) -> list[KernelConfig]:
        """The screen configs this process has yet to start."""
        return list(self._unclaimed)

    @property
    def screen_done(self) -> bool:
        return not self._unclaimed and self._running == 0

    @property
    def settled(self) -> bool:
        return self.result is not None

    @property
    def finished(self) -> bool:
        """Nothing of this bucket is left for this process."""
        return self.screen_done and (self.settled or not self.settle_here)

    def settle_ready(self) -> bool:
        return (self.settle_here and not self.settled and not self._settling and self.screen_done
                and (self.previous is None or self.previous.settled))


@dataclass(frozen=True)
class Screen:
    bucket: Bucket
    config: KernelConfig


@dataclass(frozen=True)
class Settle:
    bucket: Bucket


class Scheduler:
    """Runs ``buckets``' work on lanes (module docstring).

    ``measure(lane, problem, tokens, cfg)`` returns a screen outcome; ``settle(lane, bucket)``
    returns the bucket's ``BucketResult`` (its screen is in ``bucket.screened``, its seeds in
    ``bucket.previous.result``); ``compiled(problem, tokens, cfg)`` says whether a screen
    measurement can start without waiting for a compile (it must turn true for every config in
    time: a config nobody compiles must read as compiled); ``on_settled(bucket)`` runs after each
    settle (journal, cache, progress), on the lane's thread.
    """

    def __init__(self, buckets: Sequence[Bucket], *, measure: Callable[[Any, Problem, int, KernelConfig], Any],
                 settle: Callable[[Any, Bucket], Any], compiled: Callable[[Problem, int, KernelConfig], bool],
                 on_settled: Callable[[Bucket], None] | None = None, stops: tuple[type, ...] = (),
                 idle: Callable[[], None] = lambda: None):
        self.buckets = list(buckets)
        self._idle = idle  # called while a lane waits (the sweep checks its budget there)
        self._stops = stops  # errors that only mean "stop now" (the budget): others win when both occur
        self._measure, self._settle, self._compiled = measure, settle, compiled
        self._on_settled = on_settled
        self._cond = threading.Condition()
        self._errors: list[BaseException] = []
        self._current: dict[int, Bucket] = {}

    def wake(self) -> None:
        """Something outside changed (a compile finished): let waiting lanes look again."""
        with self._cond:
            self._cond.notify_all()

    # -- choosing ---------------------------------------------------------------------------------

    def _claim_screen(self, lane_id: int, bucket: Bucket, cfg: KernelConfig) -> Screen:
        bucket._unclaimed.remove(cfg)
        bucket._running += 1
        self._hold(lane_id, bucket)
        return Screen(bucket, cfg)

    def _hold(self, lane_id: int, bucket: Bucket) -> None:
        previous = self._current.get(lane_id)
        if previous is not None:
            previous._holders.discard(lane_id)
        bucket._holders.add(lane_id)
        self._current[lane_id] = bucket

    def _ready_config(self, bucket: Bucket) -> KernelConfig | None:
        for cfg in bucket._unclaimed:
            if self._compiled(bucket.problem, bucket.tokens, cfg):
                return cfg
        return None

    def _pick(self, lane_id: int) -> Screen | Settle | None:
        for bucket in self.buckets:  # 1. the chains first
            if bucket.settle_ready():
                bucket._settling = True
                self._hold(lane_id, bucket)
                return Settle(bucket)
        current = self._current.get(lane_id)
        if current is not None and current._unclaimed:  # 2. stay on this lane's bucket
            cfg = self._ready_config(current)
            if cfg is not None:
                return self._claim_screen(lane_id, current, cfg)
        open_ = [b for b in self.buckets if b._unclaimed]
        for free_only in (True, False):  # 3. a compiled config elsewhere, unheld buckets first
            for bucket in open_:
                if free_only and bucket._holders - {lane_id}:
                    continue
                cfg = self._ready_config(bucket)
                if cfg is not None:
                    return self._claim_screen(lane_id, bucket, cfg)
        return None

    def _next(self, lane_id: int) -> Screen | Settle | None:
        with self._cond:
            while True:
                if self._errors:
                    return None
                work = self._pick(lane_id)
                if work is not None:
                    return work
                if all(b.finished for b in self.buckets):
                    return None
                try:
                    self._idle()
                except BaseException as exc:  # noqa: BLE001 - the budget ran out while waiting
                    self._errors.append(exc)
                    self._cond.notify_all()
                    return None
                self._cond.wait(_POLL_S)  # 4. compiles or another lane's work will bring more

    # -- running ----------------------------------------------------------------------------------

    def _work(self, lane_id: int, lane: Any) -> None:
        while True:
            work = self._next(lane_id)
            if work is None:
                return
            try:
                if isinstance(work, Screen):
                    outcome = self._measure(lane, work.bucket.problem, work.bucket.tokens, work.config)
                    with self._cond:
                        work.bucket.screened[work.config] = outcome
                        work.bucket._running -= 1
                        self._cond.notify_all()
                else:
                    result = self._settle(lane, work.bucket)
                    with self._cond:
                        work.bucket.result = result
                        work.bucket._settling = False
                    if self._on_settled is not None:
                        self._on_settled(work.bucket)
                    with self._cond:
                        self._cond.notify_all()
            except BaseException as exc:  # noqa: BLE001 - raised by run() once every lane stopped
                with self._cond:
                    self._errors.append(exc)
                    self._cond.notify_all()
                return

    def run(self, lanes: Sequence[Any]) -> None:
        """Run every bucket's work on ``lanes`` (one thread each; the calling thread with one)."""
        if len(lanes) == 1:
            self._work(0, lanes[0])
        else:
            threads = [threading.Thread(target=self._work, args=(i, lane), name=f"moe-tune-lane-{i}", daemon=True)
                       for i, lane in enumerate(lanes)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        if self._errors:
            raise next((e for e in self._errors if not isinstance(e, self._stops)), self._errors[0])
