"""The sweep's measuring machinery: a compile pool, one timing worker per lane, and the journal memo.

Data flow: ``Engine(device, ...)`` starts (``start``) a compile pool (``workers.WorkerPool``:
the host's cores less one per timing lane and one for this process, at most
``MAX_COMPILE_WORKERS``, spread over the lanes' GPUs) and one timing worker per lane
(``workers.WorkerProcess`` pinned to its GPU), all in the background. ``precompile`` warms
Triton's on-disk cache with configs about to be screened. A ``Lane`` is one timing worker: its
``measure`` and ``versus`` (the ``search.Evaluator`` protocol) wait for the config's compile, send
one request (``protocol``), and record the reply in the journal (fsynced) before the search sees
it. A measurement a resumed journal already holds is answered from the memo instead, and a
journalled compile failure is not compiled again. ``deadline`` stops new measurements with
``BudgetExhausted``. ``EngineStats`` counts what happened, for the report.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from moe_tune.device import DeviceInfo
from moe_tune.errors import MoeTuneError
from moe_tune.problem import DTYPE_BYTES, KernelConfig, Problem
from moe_tune.tuning.journal import Journal
from moe_tune.tuning.options import DEFAULT_CANDIDATE_TIMEOUT_S
from moe_tune.tuning.protocol import Outcome, Versus, compile_request, measure_request, versus_request
from moe_tune.tuning.routing_spec import RoutingSpec


class BudgetExhausted(MoeTuneError):
    """The sweep's wall-clock budget ran out (finished buckets are written; resume for the rest)."""


@dataclass
class EngineStats:
    compiles: int = 0
    compile_failures: int = 0
    compile_seconds: float = 0.0
    measurements: int = 0
    replayed: int = 0  # answered from a resumed journal
    failures: int = 0
    worker_restarts: int = 0
    compile_workers: int = 0
    compile_wall_s: float | None = None  # first compile submitted → last one finished
    first_launch_ms: list[float] = field(default_factory=list)
    lane_busy_s: list[float] = field(default_factory=list)  # per lane: seconds its worker spent measuring
    case_builds: int = 0  # buckets' inputs built by the timing workers (a lane that changes bucket)
    case_build_s: float = 0.0
    # Seconds since the sweep started: the first compile landed, the last one did; per lane, its
    # first measurement began and its last one ended (a lane's idle time is its span less its busy time).
    timeline: dict[str, Any] = field(default_factory=dict)

    def merge(self, other: "EngineStats") -> None:
        """Add another process's counts (a torchrun rank's, on rank 0)."""
        for name in ("compiles", "compile_failures", "compile_seconds", "measurements", "replayed", "failures",
                     "worker_restarts", "compile_workers"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        if other.compile_wall_s is not None:
            self.compile_wall_s = max(self.compile_wall_s or 0.0, other.compile_wall_s)
        self.first_launch_ms.extend(other.first_launch_ms)
        self.lane_busy_s.extend(other.lane_busy_s)
        self.case_builds += other.case_builds
        self.case_build_s += other.case_build_s
        self.timeline.setdefault("ranks", []).append(other.timeline)

    def to_dict(self) -> dict[str, Any]:
        launches = sorted(self.first_launch_ms)
        return {
            "compiles": self.compiles,
            "compile_failures": self.compile_failures,
            "compile_cpu_seconds": round(self.compile_seconds, 3),
            "compile_workers": self.compile_workers,
            "compile_wall_s": round(self.compile_wall_s, 3) if self.compile_wall_s is not None else None,
            "measurements": self.measurements,
            "replayed_from_journal": self.replayed,
            "failed_measurements": self.failures,
            "worker_restarts": self.worker_restarts,
            # First launch of each candidate in the timing worker: tens of ms when the compile
            # pool built it, ~1 s when it had to compile itself.
            "first_launch_ms_median": launches[len(launches) // 2] if launches else None,
            "lane_busy_s": [round(s, 2) for s in self.lane_busy_s],
            "case_builds": self.case_builds,
            "case_build_s": round(self.case_build_s, 2),
            "timeline": self.timeline,
        }


# Compile workers per sweep process at most: each holds a CUDA context (~0.5 GB of GPU memory) and
# the problem's weight tensor. On a 64-core host (4 × H200, 2026-11-27) 32 workers compiled the
# qwen3-30b-a3b sweep's 279 configs in ~21 s at ~1.7 s each; 41-61 workers took 26-30 s at 3-5 s
# each (and started slower): past ~32 processes the host's shared resources, not cores, limit.
MAX_COMPILE_WORKERS = 32


def compile_workers(requested: int | None, interpreter: bool, problems: list[Problem], lanes: Sequence[str], *,
                     processes_per_host: int = 1) -> int:
    """Processes of the compile pool: the host's cores less one per timing lane and one for this
    process, shared among the sweep processes of the host (torchrun's ``LOCAL_WORLD_SIZE``), and
    no more than 40% of the lanes' free GPU memory holds (the pool spreads over the lanes' GPUs)."""
    if requested is not None:
        return max(0, requested)
    if interpreter:
        return 0  # nothing to compile: the interpreter runs the Python source
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 2
    count = max(1, min(MAX_COMPILE_WORKERS, (cores - processes_per_host * (len(lanes) + 1)) // processes_per_host))
    # Each compile worker allocates the problem's weight tensor (never read) and a CUDA context.
    import torch

    per_worker = max(p.E * p.N * p.K * DTYPE_BYTES[p.dtype] for p in problems) + (600 << 20)
    gpus = [int(lane.split(":")[1]) for lane in lanes if lane.startswith("cuda:")] or [torch.cuda.current_device()]
    room = sum(int(0.4 * torch.cuda.mem_get_info(g)[0] // per_worker) for g in gpus)
    return max(1, min(count, room))


class Engine:
    """Compile pool + one timing worker per device (a ``Lane`` each) + journal memo.

    ``devices``: one entry per timing lane, ``"cuda:I"`` (the worker sees this process's GPU I as
    its only GPU), ``"cpu"`` (the interpreter) or ``"default"`` (the worker inherits this
    process's device). The compile pool, the memo and the journal are shared by the lanes (a
    lock serialises them). ``Engine.measure`` and ``Engine.versus`` are lane 0's (one-GPU callers
    use the engine itself as the ``Evaluator``). ``bench``: what the workers serve requests with
    (default ``candidate.Bench``). ``timer``: answers measurements in this process instead of the
    workers, ``timer(problem, tokens, cfg, stage) -> Outcome`` (a head to head asks it for each of
    the two configs, stage ``versus``): the tests' deterministic stand-in for a GPU.
    """

    def __init__(self, device: DeviceInfo, *, routing: RoutingSpec, seed: int, buckets: tuple[int, ...],
                 candidate_timeout_s: float = DEFAULT_CANDIDATE_TIMEOUT_S, compile_workers: int = 0,
                 bench: Callable[[], Any] | None = None, journal: Journal | None = None,
                 deadline: float | None = None, on_measure: Callable[[Problem], None] | None = None,
                 devices: Sequence[str] = ("default",), memo_records: Iterable[Mapping[str, Any]] = (),
                 timer: Callable[[Problem, int, KernelConfig, str], Outcome] | None = None,
                 epoch: float | None = None):
        from moe_tune.tuning.workers import WorkerPool, WorkerProcess

        self.device = device
        self.routing, self.seed, self.buckets = routing, seed, buckets
        self.timeout = candidate_timeout_s
        self.journal = journal
        self.deadline = deadline
        self.on_measure = on_measure
        self.on_compiled: Callable[[], None] | None = None  # the scheduler's wake-up, while it runs
        self.timer = timer
        self.stats = EngineStats()
        self._lock = threading.RLock()
        self.lanes = [Lane(self, i, name, WorkerProcess(bench=bench, name=f"moe-tune-timing-{i}",
                                                        env=lane_env(name)))
                      for i, name in enumerate(devices)]
        self.stats.lane_busy_s = [0.0] * len(self.lanes)
        self.epoch = time.monotonic() if epoch is None else epoch
        self._lane_span: list[list[float]] = [[] for _ in self.lanes]
        envs = [lane_env(name) for name in devices]
        self.pool = WorkerPool(compile_workers, bench=bench, envs=envs) if compile_workers > 0 else None
        self.stats.compile_workers = compile_workers
        self._compile_started: float | None = None
        self._compile_finished: list[float] = []
        self._compiles: dict[tuple[str, KernelConfig], Future] = {}
        self._compile_errors: dict[tuple[str, KernelConfig], str] = {}
        self._memo: dict[tuple[str, int, str, str], Outcome | Versus] = {}
        records = list(journal.records) if journal is not None else []
        for record in [*records, *memo_records]:
            kind = record.get("type")
            if kind in ("measure", "versus"):
                key = (record["problem"], record["tokens"], record["stage"], record["config_short"])
                self._memo[key] = (Outcome if kind == "measure" else Versus).from_dict(record["outcome"])
            elif kind == "compile" and not record.get("ok"):
                cfg = KernelConfig.from_dict(record["config"])
                self._compile_errors[(record["problem"], cfg)] = record.get("error") or "compile failed"

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        # The lanes' workers and the pool shut down in parallel: each exit tears down a CUDA
        # context (and a lane's cached cases), ~1-2 s apiece.
        closing = [threading.Thread(target=_close_lane, args=(lane,), daemon=True) for lane in self.lanes]
        for thread in closing:
            thread.start()
        if self.pool is not None:
            self.pool.close(cancel_pending=True)
            self.stats.worker_restarts += self.pool.restarts
            self.pool = None
        if self._compile_started is not None and self._compile_finished:
            self.stats.compile_wall_s = max(self._compile_finished) - self._compile_started
            self.stats.timeline["first_compile_s"] = round(min(self._compile_finished) - self.epoch, 2)
            self.stats.timeline["last_compile_s"] = round(max(self._compile_finished) - self.epoch, 2)
        self.stats.timeline["lanes"] = [[round(t - self.epoch, 2) for t in (span[0], span[-1])] if span else None
                                        for span in self._lane_span]
        for lane, thread in zip(self.lanes, closing):
            thread.join()
            self.stats.worker_restarts += lane.worker.restarts
        self.stats.timeline["closed_s"] = round(time.monotonic() - self.epoch, 2)

    def start(self) -> None:
        """Start every lane's timing worker now, in the background and in parallel (each imports
        torch and creates a CUDA context: seconds that overlap the compile pool's start). A lane's
        first measurement waits for its worker; one that failed to start raises there."""
        if self.timer is not None:
            return
        for lane in self.lanes:
            lane.starting = threading.Thread(target=_start_quietly, args=(lane.worker,), daemon=True)
            lane.starting.start()

    def record(self, record: Mapping[str, Any]) -> None:
        """Append to the journal (shared by the lanes)."""
        if self.journal is not None:
            with self._lock:
                self.journal.append(record)

    # -- compile --------------------------------------------------------------------------------

    def precompile(self, problem: Problem, configs: list[KernelConfig]) -> None:
        if self.pool is None:
            return
        for cfg in configs:
            key = (problem.key, cfg)
            if key in self._compiles or key in self._compile_errors:
                continue
            if self._compile_started is None:
                self._compile_started = time.monotonic()
            future = self.pool.submit(compile_request(problem, cfg, self.buckets), timeout=max(self.timeout, 300.0))
            future.add_done_callback(self._compile_done)
            self._compiles[key] = future

    def _compile_done(self, future: Future) -> None:
        if not future.cancelled():
            self._compile_finished.append(time.monotonic())
        if self.on_compiled is not None:
            self.on_compiled()

    def answered(self, problem: Problem, tokens: int, stage: str, cfg: KernelConfig) -> bool:
        """Whether a journal (this run's or a resumed one) already holds this measurement."""
        with self._lock:
            return (problem.key, tokens, stage, cfg.short()) in self._memo

    def compiled(self, problem: Problem, tokens: int, cfg: KernelConfig) -> bool:
        """Whether a screen measurement of ``cfg`` can start without waiting for its compile (the
        journal already holds it, its compile finished or failed, or it was never sent to the pool)."""
        if self.answered(problem, tokens, "screen", cfg):
            return True
        with self._lock:
            future = self._compiles.get((problem.key, cfg))
        return future is None or future.done()

    def _compile_error(self, problem: Problem, cfg: KernelConfig) -> str | None:
        key = (problem.key, cfg)
        with self._lock:
            if key in self._compile_errors:
                return self._compile_errors[key]
            future = self._compiles.get(key)
        if future is None:
            return None
        remaining = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
        try:
            reply = future.result(timeout=remaining)
        except FutureTimeout:
            raise BudgetExhausted("the time budget ran out while candidates were compiling") from None
        except Exception as exc:  # the pool could not start a worker: compile in the timing worker
            reply = {"ok": True, "seconds": 0.0, "note": f"precompile unavailable: {exc}"}
        with self._lock:
            if self._compiles.pop(key, None) is None:  # another lane accounted for it meanwhile
                return self._compile_errors.get(key)
            self.stats.compiles += 1
            self.stats.compile_seconds += float(reply.get("seconds", 0.0))
            error = None if reply.get("ok") else (reply.get("error") or "compile failed")
            self.record({"type": "compile", "problem": problem.key, "config": cfg.to_dict(),
                         "ok": error is None, "error": error, "seconds": reply.get("seconds")})
            if error is not None:
                self.stats.compile_failures += 1
                self._compile_errors[key] = error
        return error

    # -- measure (the Evaluator protocol) -------------------------------------------------------

    def check_budget(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise BudgetExhausted("the time budget ran out")

    def measure(self, problem: Problem, tokens: int, cfg: KernelConfig, stage: str) -> Outcome:
        return self.lanes[0].measure(problem, tokens, cfg, stage)

    def versus(self, problem: Problem, tokens: int, challenger: KernelConfig, default: KernelConfig,
               rounds: int) -> Versus:
        return self.lanes[0].versus(problem, tokens, challenger, default, rounds)

    def _measure(self, lane: "Lane", problem: Problem, tokens: int, cfg: KernelConfig, stage: str) -> Outcome:
        def run() -> Outcome:
            compile_error = self._compile_error(problem, cfg)
            if compile_error is not None:
                return Outcome.failed(f"compile failed: {compile_error}")
            if self.timer is not None:
                return self.timer(problem, tokens, cfg, stage)
            request = measure_request(problem, tokens, self.routing, self.seed, cfg, stage)
            return Outcome.from_dict(self._call(lane, request))

        def record_of(outcome: Outcome) -> dict[str, Any]:
            if outcome.ok and outcome.first_launch_ms is not None:
                self.stats.first_launch_ms.append(outcome.first_launch_ms)
            if outcome.case_ms is not None:
                self.stats.case_builds += 1
                self.stats.case_build_s += outcome.case_ms / 1e3
            return {"type": "measure", "problem": problem.key, "tokens": tokens, "stage": stage,
                    "config_short": cfg.short(), "config": cfg.to_dict(), "outcome": outcome.to_dict()}

        return self._answer(lane, problem, (problem.key, tokens, stage, cfg.short()), run, record_of)

    def _versus(self, lane: "Lane", problem: Problem, tokens: int, challenger: KernelConfig, default: KernelConfig,
                rounds: int) -> Versus:
        shorts = f"{challenger.short()}|{default.short()}"

        def run() -> Versus:
            if self.timer is not None:
                return Versus(self.timer(problem, tokens, challenger, "versus"),
                              self.timer(problem, tokens, default, "versus"))
            request = versus_request(problem, tokens, self.routing, self.seed, challenger, default, rounds)
            return Versus.from_dict(self._call(lane, request))

        def record_of(versus: Versus) -> dict[str, Any]:
            return {"type": "versus", "problem": problem.key, "tokens": tokens, "stage": "versus",
                    "config_short": shorts, "challenger": challenger.to_dict(), "default": default.to_dict(),
                    "rounds": rounds, "outcome": versus.to_dict()}

        return self._answer(lane, problem, (problem.key, tokens, "versus", shorts), run, record_of)

    def _answer(self, lane: "Lane", problem: Problem, key: tuple, run: Callable[[], Any],
                record_of: Callable[[Any], dict[str, Any]]):
        """The memo's answer for ``key``, else ``run()``'s, counted, journalled (``record_of``: its
        journal record, and its share of the stats) and memoised."""
        with self._lock:
            memo = self._memo.get(key)
            if memo is not None:
                self.stats.replayed += 1
        if memo is None:
            self.check_budget()
            busy = time.monotonic()
            answer = run()
            now = time.monotonic()
            self.stats.lane_busy_s[lane.index] += now - busy  # one thread per lane
            span = self._lane_span[lane.index]
            span[:] = [span[0] if span else busy, now]
            with self._lock:
                self.stats.measurements += 1
                if not _all_ok(answer):
                    self.stats.failures += 1
                self.record(record_of(answer))
                self._memo[key] = answer
        if self.on_measure:
            self.on_measure(problem)
        return memo if memo is not None else answer

    def _call(self, lane: "Lane", request: Mapping[str, Any]) -> dict[str, Any]:
        if lane.starting is not None:
            lane.starting.join()
            lane.starting = None
        return lane.worker.call(request, self.timeout)


def _all_ok(answer: Outcome | Versus) -> bool:
    if isinstance(answer, Versus):
        return answer.challenger.ok and answer.default.ok
    return answer.ok


@dataclass
class Lane:
    """One timing worker on one device: the ``Evaluator`` a settle runs on."""

    engine: Engine
    index: int
    device: str
    worker: Any
    starting: threading.Thread | None = None  # the background start of its worker (Engine.start)

    @property
    def name(self) -> str:
        return f"lane{self.index}:{self.device}"

    def measure(self, problem: Problem, tokens: int, cfg: KernelConfig, stage: str) -> Outcome:
        return self.engine._measure(self, problem, tokens, cfg, stage)

    def versus(self, problem: Problem, tokens: int, challenger: KernelConfig, default: KernelConfig,
               rounds: int) -> Versus:
        return self.engine._versus(self, problem, tokens, challenger, default, rounds)


def _close_lane(lane: Lane) -> None:
    if lane.starting is not None:  # never measured: let its start finish before stopping it
        lane.starting.join()
    lane.worker.close()


def _start_quietly(worker) -> None:
    from moe_tune.tuning.workers import WorkerStartError

    try:
        worker.start()
    except WorkerStartError:
        pass  # the worker remembers why; the lane's first measurement raises it


def lane_env(device: str) -> dict[str, str]:
    """The worker's environment for a lane: a ``cuda:I`` lane sees only this process's GPU I."""
    if device.startswith("cuda:"):
        from moe_tune.tuning.distribute import physical_gpu

        return {"CUDA_VISIBLE_DEVICES": physical_gpu(int(device.split(":", 1)[1]))}
    return {}
