"""``moe-tune sweep``'s engine: a model's problems × token buckets → tuned configs in the cache.

Data flow of ``run_sweep(options)``:

1. the timing lanes (``lane_devices``: one per GPU of ``--gpus``, default every visible GPU; the
   ``LOCAL_RANK`` GPU under torchrun; CPU lanes under the interpreter), the device they share
   (lanes of different GPU models are refused), the problems (``MoeShape.problems`` filtered by
   pass and GEMM) and one ``search.ProblemPlan`` each;
2. the split (``distribute``): a shard (``--shard i/n``) takes whole problems, a torchrun rank
   its share of two phases (``run_ranked``), a plain sweep everything;
3. the journal (``journal.Journal``, ``<cache dir>/journals/``, one file per shard or rank),
   resumed or fresh; with ``--resume`` the other journals of the same sweep are read too, so a
   re-run in any layout redoes only what no journal holds;
4. an ``Engine``: a compile pool (``workers.WorkerPool``: the host's cores less one per timing
   lane and one for this process, at most ``MAX_COMPILE_WORKERS``, spread over the lanes' GPUs)
   warms Triton's on-disk cache with the configs to screen, problem by problem; one timing worker
   per lane (``workers.WorkerProcess`` pinned to its GPU) gates and times candidates one at a time,
   each with a timeout. Both start at once, in the background. Every outcome is journalled
   (fsynced) before the search sees it, and a resumed journal answers what it already holds;
5. ``_Run.phase``: the buckets (bucket-major: every problem's smallest first) go to a
   ``schedule.Scheduler``, whose lanes take single screen measurements of compiled configs and
   whole settles (``search.settle_bucket``, seeded with the previous bucket's winner and runner-up)
   as they become ready; each settled bucket is journalled, and a problem's buckets are merged into
   the cache file (``cache.CacheStore``: locked, merged, provenance filled in) once all are settled;
6. under torchrun, every rank's settled buckets go to rank 0 (``distribute.Gather``), which writes
   them; a rank that did not report is named in ``stopped``;
7. a ``SweepReport`` (the CLI prints it as a table or JSON).

``budget_s`` stops the sweep before the next measurement once the wall clock passes it;
finished buckets are written and ``--resume`` carries on from the journal.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

from moe_tune import __version__
from moe_tune.device import INTERPRETER_DEVICE, DeviceInfo
from moe_tune.errors import InvalidInputError, MoeTuneError
from moe_tune.models import ModelSpec
from moe_tune.problem import DTYPE_BYTES, DTYPES, PASSES, KernelConfig, Problem
from moe_tune.space import SPACES
from moe_tune.tuning.journal import Journal
from moe_tune.tuning.schedule import Bucket, Scheduler
from moe_tune.tuning.search import (
    BucketResult,
    ProblemPlan,
    SearchPolicy,
    measurements_planned,
    plan_problem,
    policy_for,
    settle_bucket,
)
from moe_tune.tuning.timing import FAULT_KINDS, Outcome, RoutingSpec

GEMMS = ("up", "down")
# Tokens per micro-batch: 1k-32k covers training micro-batches from one 1k sequence to 8×4k;
# larger counts take the 32k bucket (the runtime picks the nearest bucket) and behave alike.
DEFAULT_TOKENS = (1024, 2048, 4096, 8192, 16384, 32768)
INTERPRETER_TOKENS = (32, 64)
# The interpreter runs a 64-token launch of the tiny preset in ~0.1 s; anything much larger
# would make `--interpret` a coffee break.
_INTERPRETER_MAX_ELEMENTS = 1 << 20
_INTERPRETER_MAX_TOKENS = 1024
DEFAULT_CANDIDATE_TIMEOUT_S = 120.0


class BudgetExhausted(MoeTuneError):
    """The sweep's wall-clock budget ran out (finished buckets are written; resume for the rest)."""


class SweepFailed(MoeTuneError):
    """The sweep ran but some bucket has no config that passed the gate (CLI exit 1)."""


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------


@dataclass
class SweepOptions:
    model: ModelSpec
    tokens: tuple[int, ...] | None = None  # None: DEFAULT_TOKENS (INTERPRETER_TOKENS with interpret)
    passes: tuple[str, ...] = PASSES
    gemms: tuple[str, ...] = GEMMS
    dtype: str | None = None  # None: bfloat16 (float32 with interpret)
    routing: RoutingSpec = field(default_factory=RoutingSpec)
    space: str | None = None  # None: "default" ("interpret" with interpret)
    exhaustive: bool = False
    budget_s: float | None = None
    cache_dir: str | os.PathLike | None = None
    resume: bool = False
    interpret: bool = False
    seed: int = 0
    candidate_timeout_s: float = DEFAULT_CANDIDATE_TIMEOUT_S
    compile_workers: int | None = None  # None: automatic (none under the interpreter)
    faults: Mapping[str, str] = field(default_factory=dict)  # test hook, see timing.Bench
    policy: SearchPolicy | None = None  # None: search.policy_for(space, exhaustive)
    write_cache: bool = True
    gpus: tuple[int, ...] | None = None  # None: every visible GPU (one CPU lane with interpret)
    shard: tuple[int, int] | None = None  # (i, n): this job runs its deterministic 1/n of the units
    devices: tuple[str, ...] | None = None  # test hook: the lanes' devices, e.g. ("cpu", "cpu")
    timer: Callable[..., Outcome] | None = None  # test hook, see Engine
    gather_timeout_s: float | None = None  # None: distribute.GATHER_TIMEOUT

    def resolved(self) -> "SweepOptions":
        """A copy with every default filled in, validated (``InvalidInputError`` otherwise)."""
        tokens = self.tokens or (INTERPRETER_TOKENS if self.interpret else DEFAULT_TOKENS)
        tokens = tuple(sorted(set(tokens)))
        if any(not isinstance(t, int) or isinstance(t, bool) or t <= 0 for t in tokens):
            raise InvalidInputError(f"--tokens must be positive integers, got {list(tokens)}")
        dtype = self.dtype or ("float32" if self.interpret else "bfloat16")
        if dtype not in DTYPES:
            raise InvalidInputError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        space = self.space or ("interpret" if self.interpret else "default")
        if space not in SPACES:
            raise InvalidInputError(f"--space must be one of {', '.join(SPACES)}, got {space!r}")
        for name, values, allowed in (("--passes", self.passes, PASSES), ("--gemms", self.gemms, GEMMS)):
            bad = [v for v in values if v not in allowed]
            if bad or not values:
                raise InvalidInputError(f"{name} takes {', '.join(allowed)}; got {', '.join(values) or 'nothing'}")
        for cfg, kind in self.faults.items():
            if kind not in FAULT_KINDS:
                raise InvalidInputError(f"fault for {cfg} must be one of {', '.join(FAULT_KINDS)}, got {kind!r}")
        if self.shard is not None:
            i, n = self.shard
            if not 0 <= i < n:
                raise InvalidInputError(f"--shard takes i/n with 0 <= i < n, got {i}/{n}")
        if self.gpus is not None and (not self.gpus or len(set(self.gpus)) != len(self.gpus)
                                      or min(self.gpus) < 0):
            raise InvalidInputError(f"--gpus takes distinct GPU indices, got {list(self.gpus)}")
        if self.gather_timeout_s is not None and not self.gather_timeout_s > 0:
            raise InvalidInputError(f"--gather-timeout must be a positive number of seconds, got {self.gather_timeout_s}")
        if self.budget_s is not None and not self.budget_s > 0:
            raise InvalidInputError(f"--budget must be a positive number of seconds, got {self.budget_s}")
        if self.interpret:
            if dtype == "bfloat16":
                raise InvalidInputError("--interpret runs float32 or float16: Triton's interpreter computes "
                                        "bfloat16 wrongly")
            shape = self.model.shape
            biggest = max(shape.E * 2 * shape.I * shape.H, shape.E * shape.H * shape.I)
            if biggest > _INTERPRETER_MAX_ELEMENTS or tokens[-1] > _INTERPRETER_MAX_TOKENS:
                raise InvalidInputError(
                    f"--interpret runs kernels on the CPU, one program at a time: {self.model.name} with "
                    f"{tokens[-1]} tokens would take hours; use --model tiny (and --tokens ≤ {_INTERPRETER_MAX_TOKENS})")
        if self.routing.kind == "trace":
            self.routing.load_trace(self.model.shape.E, self.model.shape.topk)  # fail now, not in a worker
        policy = self.policy or policy_for(space, exhaustive=self.exhaustive, interpreter=self.interpret)
        return _replace(self, tokens=tokens, dtype=dtype, space=space, policy=policy)


def _replace(options: SweepOptions, **changes: Any) -> SweepOptions:
    import dataclasses

    return dataclasses.replace(options, **changes)


def select_problems(options: SweepOptions) -> list[Problem]:
    return [p for p in options.model.shape.problems(options.dtype)
            if p.pass_ in options.passes and p.gemm in options.gemms]


def detect_device(interpret: bool) -> DeviceInfo:
    """The device to tune: the current CUDA GPU, or the interpreter (``NoGPUError`` without one)."""
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before any worker starts: they inherit it
        return INTERPRETER_DEVICE
    from moe_tune.device import query_device
    from moe_tune.errors import NoGPUError

    try:
        import torch
    except ImportError:
        raise NoGPUError("torch is not installed") from None
    if not torch.cuda.is_available():
        raise NoGPUError("no CUDA GPU is visible: `moe-tune sweep` times kernels on the GPU it runs on "
                         "(try `--interpret` for a CPU dry run on the tiny preset)")
    return query_device()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.") or "model"


# ---------------------------------------------------------------------------------------------
# Engine: workers + journal memo
# ---------------------------------------------------------------------------------------------


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


def _compile_workers(requested: int | None, interpreter: bool, problems: list[Problem], lanes: Sequence[str], *,
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
    lock serialises them); each lane's worker is started by its first measurement, so lanes
    start in parallel when they run in threads. ``Engine.measure`` is lane 0's (one-GPU callers
    use the engine itself as the ``Evaluator``). ``timer`` (test hook) answers measurements in
    this process instead of the workers: ``timer(problem, tokens, cfg, stage) -> Outcome``.
    """

    def __init__(self, device: DeviceInfo, *, routing: RoutingSpec, seed: int, buckets: tuple[int, ...],
                 candidate_timeout_s: float = DEFAULT_CANDIDATE_TIMEOUT_S, compile_workers: int = 0,
                 faults: Mapping[str, str] | None = None, journal: Journal | None = None,
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
        self.lanes = [Lane(self, i, name, WorkerProcess(faults=faults, name=f"moe-tune-timing-{i}",
                                                        env=_lane_env(name)))
                      for i, name in enumerate(devices)]
        self.worker = self.lanes[0].worker
        self.stats.lane_busy_s = [0.0] * len(self.lanes)
        self.epoch = time.monotonic() if epoch is None else epoch
        self._lane_span: list[list[float]] = [[] for _ in self.lanes]
        envs = [_lane_env(name) for name in devices]
        self.pool = WorkerPool(compile_workers, faults=faults, envs=envs) if compile_workers > 0 else None
        self.stats.compile_workers = compile_workers
        self._compile_started: float | None = None
        self._compile_finished: list[float] = []
        self._compiles: dict[tuple[str, KernelConfig], Future] = {}
        self._compile_errors: dict[tuple[str, KernelConfig], str] = {}
        self._memo: dict[tuple[str, int, str, str], Outcome] = {}
        records = list(journal.records) if journal is not None else []
        for record in [*records, *memo_records]:
            if record.get("type") == "measure":
                key = (record["problem"], record["tokens"], record["stage"], record["config_short"])
                self._memo[key] = Outcome.from_dict(record["outcome"])
            elif record.get("type") == "compile" and not record.get("ok"):
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
            request = {"op": "compile", "problem": problem.to_dict(), "config": cfg.to_dict(),
                       "tokens": list(self.buckets)}
            if self._compile_started is None:
                self._compile_started = time.monotonic()
            future = self.pool.submit(request, timeout=max(self.timeout, 300.0))
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

    def _measure(self, lane: "Lane", problem: Problem, tokens: int, cfg: KernelConfig, stage: str) -> Outcome:
        key = (problem.key, tokens, stage, cfg.short())
        with self._lock:
            memo = self._memo.get(key)
            if memo is not None:
                self.stats.replayed += 1
        if memo is not None:
            if self.on_measure:
                self.on_measure(problem)
            return memo
        self.check_budget()
        compile_error = self._compile_error(problem, cfg)
        if compile_error is not None:
            outcome = Outcome.failed(f"compile failed: {compile_error}")
        else:
            if lane.starting is not None:
                lane.starting.join()
                lane.starting = None
            busy = time.monotonic()
            if self.timer is not None:
                outcome = self.timer(problem, tokens, cfg, stage)
            else:
                request = {"op": "measure", "problem": problem.to_dict(), "tokens": tokens,
                           "routing": {"kind": self.routing.kind, "skew": self.routing.skew,
                                       "path": self.routing.path},
                           "seed": self.seed, "config": cfg.to_dict(), "stage": stage}
                outcome = Outcome.from_dict(lane.worker.call(request, self.timeout))
            now = time.monotonic()
            self.stats.lane_busy_s[lane.index] += now - busy  # one thread per lane
            span = self._lane_span[lane.index]
            span[:] = [span[0] if span else busy, now]
        with self._lock:
            self.stats.measurements += 1
            if not outcome.ok:
                self.stats.failures += 1
            elif outcome.first_launch_ms is not None:
                self.stats.first_launch_ms.append(outcome.first_launch_ms)
            if outcome.case_ms is not None:
                self.stats.case_builds += 1
                self.stats.case_build_s += outcome.case_ms / 1e3
            self.record({"type": "measure", "problem": problem.key, "tokens": tokens, "stage": stage,
                         "config_short": cfg.short(), "config": cfg.to_dict(), "outcome": outcome.to_dict()})
            self._memo[key] = outcome
        if self.on_measure:
            self.on_measure(problem)
        return outcome


@dataclass
class Lane:
    """One timing worker on one device: the ``Evaluator`` a unit's searches run on."""

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


def _lane_env(device: str) -> dict[str, str]:
    """The worker's environment for a lane: a ``cuda:I`` lane sees only this process's GPU I."""
    if device.startswith("cuda:"):
        from moe_tune.tuning.distribute import physical_gpu

        return {"CUDA_VISIBLE_DEVICES": physical_gpu(int(device.split(":", 1)[1]))}
    return {}


# ---------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------


class Progress(Protocol):
    """Where the sweep reports progress (the CLI draws rich progress bars on stderr). With
    several GPUs, several problems are in flight at once, from several threads."""

    def start_problem(self, problem: Problem, total: int) -> None: ...
    def advance(self, problem: Problem) -> None: ...
    def finish_problem(self, problem: Problem) -> None: ...
    def note(self, message: str) -> None: ...


class _Silent:
    def start_problem(self, problem: Problem, total: int) -> None:
        pass

    def advance(self, problem: Problem) -> None:
        pass

    def finish_problem(self, problem: Problem) -> None:
        pass

    def note(self, message: str) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


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
                {"problem": p.key, "gemm": p.gemm, "pass": p.pass_, "buckets": [b.to_dict() for b in buckets]}
                for p, buckets in self.results.items()
            ],
        }


# ---------------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------------


def journal_settings(options: SweepOptions, device: DeviceInfo, problems: list[Problem]) -> dict[str, Any]:
    """What a resumed sweep must share with the journal it continues."""
    from moe_tune.cache.software import kernel_source_hash, triton_version

    shape = options.model.shape
    return {
        "model": options.model.name,
        "shape": {"E": shape.E, "H": shape.H, "I": shape.I, "topk": shape.topk},
        "problems": [p.key for p in problems],
        "tokens": list(options.tokens),
        "routing": options.routing.identity(),
        "seed": options.seed,
        "space": options.space,
        "policy": options.policy.to_dict(),
        "device": device.to_dict(),
        "triton": triton_version(),
        "kernel_hash": kernel_source_hash(),
        "moe_tune": __version__,
    }


def journal_path(cache_dir: Path, model: ModelSpec, device: DeviceInfo, dtype: str,
                 split: Mapping[str, Any] | None = None) -> Path:
    """``journals/sweep-<model>-<dtype>-<device>[-shard{i}of{n} | -rank{r}of{n}].jsonl``: one file
    per process that writes, so ranks and shards never share one."""
    suffix = ""
    if split is not None and split["kind"] != "all":
        suffix = f"-{'rank' if split['kind'] == 'torchrun' else 'shard'}{split['index']}of{split['count']}"
    return cache_dir / "journals" / f"sweep-{_slug(model.name)}-{dtype}-{device.slug}{suffix}.jsonl"


def sibling_records(path: Path, settings: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The records of the other journals of the same sweep (same settings but the split) beside
    ``path``: what other ranks, shards or a run with other GPUs already finished."""
    from moe_tune.tuning.journal import read_records

    base = dict(settings, split=None)
    stem = path.name.split("-rank")[0].split("-shard")[0].removesuffix(".jsonl")
    found = []
    for other in sorted(path.parent.glob(f"{stem}*.jsonl")):
        if other == path:
            continue
        rest = other.name[len(stem):].removesuffix(".jsonl")
        if rest and not re.fullmatch(r"-(rank|shard)\d+of\d+", rest):
            continue  # another model whose slug extends this one
        try:
            records = read_records(other)
        except MoeTuneError:
            continue  # a damaged sibling is not this sweep's problem
        header = records[0] if records else {}
        if header.get("type") == "header" and dict(header.get("settings", {}), split=None) == base:
            found.extend(records[1:])
    return found


def lane_devices(options: SweepOptions, launch) -> tuple[str, ...]:
    """The timing lanes of this process: ``cuda:I`` per GPU, ``cpu`` under the interpreter."""
    if options.devices is not None:
        return tuple(options.devices)
    if launch is not None and options.gpus is not None:
        raise InvalidInputError("under torchrun each rank times on its LOCAL_RANK GPU: drop --gpus "
                                "(torchrun's --nproc-per-node picks how many GPUs a node uses)")
    if options.interpret:
        return ("cpu",) * len(options.gpus or (0,))
    if launch is not None:
        return (f"cuda:{launch.local_rank}",)
    import torch

    count = torch.cuda.device_count()
    gpus = options.gpus if options.gpus is not None else tuple(range(count))
    missing = [g for g in gpus if g >= count]
    if missing:
        raise InvalidInputError(f"--gpus {missing[0]}: no such GPU (GPUs 0..{count - 1} are visible)")
    return tuple(f"cuda:{g}" for g in gpus)


def _lane_device_info(lanes: tuple[str, ...], interpret: bool) -> DeviceInfo:
    """The device every lane times on; lanes of different GPU models are refused (a cache file
    holds one device)."""
    if interpret or not lanes[0].startswith("cuda:"):
        return detect_device(interpret)
    from moe_tune.device import query_device

    infos = {lane: query_device(lane) for lane in lanes}
    names = sorted({i.name for i in infos.values()})
    if len(names) > 1:
        raise InvalidInputError(f"the GPUs differ ({', '.join(names)}): a cache file holds one device; "
                                f"pick GPUs of one kind with --gpus")
    return infos[lanes[0]]


def run_sweep(options: SweepOptions, progress: Progress | None = None) -> SweepReport:
    """Tune ``options.model``'s problems on this device (module docstring)."""
    from moe_tune.cache import paths
    from moe_tune.tuning.distribute import (GATHER_TIMEOUT, Gather, Launch, assign, bucket_costs,
                                            chain_bound, largest_first, split_settings)

    started = time.monotonic()
    options = options.resolved()
    progress = progress or _Silent()
    launch = Launch.from_env()
    if launch is not None and options.shard is not None:
        raise InvalidInputError("--shard is for independent jobs; under torchrun the ranks split the work")
    if options.devices is None or options.interpret:
        detect_device(options.interpret)  # no GPU: NoGPUError before anything else
    lanes = lane_devices(options, launch)
    device = _lane_device_info(lanes, options.interpret)
    problems = select_problems(options)
    plans = {p: plan_problem(p, device, options.space, options.tokens, options.policy) for p in problems}
    costs = {p: bucket_costs(plans[p], options.policy, device) for p in problems}
    work = {p: sum(len(plans[p].screen[t]) * screen + settle for t, (screen, settle) in costs[p].items())
            for p in problems}
    chains = {p: sum(settle for _, settle in costs[p].values()) for p in problems}

    # -- this process's share ---------------------------------------------------------------------
    if options.shard is not None:
        split = split_settings("shard", *options.shard)
    elif launch is not None:
        split = split_settings("torchrun", launch.rank, launch.world_size)
    else:
        split = split_settings("all")
    # A shard takes whole problems: with no way to talk to the others, it must settle every bucket
    # whose screen it ran, and a problem's settles chain. Torchrun ranks split finer (run_ranked).
    owner = ({p: b for b, units in enumerate(assign(work, split["count"])) for p in units}
             if split["kind"] == "shard" else {p: split["index"] for p in problems})
    mine = [p for p in problems if owner[p] == split["index"]]
    priority = largest_first({p: work[p] for p in mine})
    writes_cache = options.write_cache and (launch is None or launch.rank == 0)
    gather = None
    if launch is not None:  # join the group now: a failed rendezvous costs no tuning
        timeout = GATHER_TIMEOUT if options.gather_timeout_s is None else timedelta(seconds=options.gather_timeout_s)
        gather = Gather(launch, timeout)

    cache_dir = paths.default_store_dir(options.cache_dir)
    jpath = journal_path(cache_dir, options.model, device, options.dtype, split)
    settings = {**journal_settings(options, device, problems), "split": split}
    journal = Journal.open(jpath, settings, resume=options.resume)
    others = sibling_records(jpath, settings) if options.resume else []
    done = {(r["problem"], r["tokens"]): r["result"] for r in [*others, *journal.records] if r.get("type") == "bucket"}
    deadline = started + options.budget_s if options.budget_s else None
    todo = any((p.key, t) not in done for p in mine for t in options.tokens)
    workers = (_compile_workers(options.compile_workers, options.interpret or options.timer is not None, mine,
                                lanes, processes_per_host=launch.local_world_size if launch else 1)
               if todo else 0)
    engine = Engine(device, routing=options.routing, seed=options.seed, buckets=options.tokens,
                    candidate_timeout_s=options.candidate_timeout_s, compile_workers=workers,
                    faults=options.faults, journal=journal, deadline=deadline, on_measure=progress.advance,
                    devices=lanes, memo_records=others, timer=options.timer, epoch=started)
    if todo:
        engine.start()
    written: set[Problem] = set()
    write_lock = threading.Lock()
    cache_path = None

    def write(problem: Problem, buckets: list[BucketResult]) -> None:
        nonlocal cache_path
        if writes_cache and any(b.ok for b in buckets):
            with write_lock:
                cache_path = str(write_results(cache_dir, device, problem, buckets, time.monotonic() - started,
                                               sweep_command(options)))
                written.add(problem)

    run = _Run(options, plans, engine, progress, done, write)
    stopped = None
    try:
        for problem in priority:
            progress.start_problem(problem, sum(measurements_planned(plans[problem], options.policy).values()))
        if gather is None:
            run.phase(run.buckets(priority, settle=True))
        else:
            stopped = run_ranked(run, gather, priority, {p: costs[p] for p in priority})
    except BudgetExhausted as exc:
        stopped = f"{exc}; rerun with --resume to finish"
        progress.note(stopped)
    finally:
        engine.close()
        journal.close()

    results = run.results()
    settled_on = dict(run.settled_on)
    screened_on = {k: sorted(v) for k, v in run.screened_on.items()}

    # -- torchrun: every rank's settled buckets to rank 0 ---------------------------------------------
    if gather is not None and not run.lost_rank:
        try:
            payload = {"rank": launch.rank, "device": device, "results": results, "stats": engine.stats,
                       "stopped": stopped, "settled_on": settled_on, "screened_on": screened_on}
            payloads, missing = gather.gather(payload)
        finally:
            gather.close()
        for other in payloads:
            if other["rank"] == launch.rank:
                continue
            if other["device"].name != device.name:
                stopped = (f"rank {other['rank']} timed on {other['device'].name}, rank 0 on {device.name}: "
                           f"its results were not written (a cache file holds one device)")
                continue
            for problem, buckets in other["results"].items():
                results[problem] = buckets
            prefix = f"rank{other['rank']}:"
            settled_on.update({k: prefix + v for k, v in other["settled_on"].items()})
            for k, v in other["screened_on"].items():
                screened_on[k] = sorted({*screened_on.get(k, []), *(prefix + lane for lane in v)})
            engine.stats.merge(other["stats"])
            if other["stopped"] and not stopped:
                stopped = f"rank {other['rank']}: {other['stopped']}"
        if missing and launch.rank != 0:
            stopped = ("rank 0 did not take this rank's results (its journal keeps them): rerun with --resume "
                       "to finish")
            progress.note(stopped)
        elif missing:
            stopped = (f"rank(s) {', '.join(map(str, missing))} did not report; their journals keep what they "
                       f"finished: rerun with --resume to finish")
            progress.note(stopped)
    elif gather is not None:
        gather.close()
    for problem, buckets in results.items():  # a stopped sweep's partial problems, the other ranks' results
        if problem not in written:
            write(problem, buckets)
    results = {p: results[p] for p in problems if p in results}
    expected = mine if launch is None else problems if launch.rank == 0 else list(run.chains)
    complete = stopped is None and all(len(results.get(p, [])) == len(options.tokens) for p in expected)
    units = [{"problem": p.key, "tokens": t, "cost_ms": round(len(plans[p].screen[t]) * costs[p][t][0]
                                                               + costs[p][t][1], 1),
              "bin": owner[p], "screened_on": screened_on.get((p.key, t), []),
              "settled_on": settled_on.get((p.key, t))}
             for p in problems if p in mine or p in results for t in options.tokens]
    if split["kind"] == "torchrun":
        bound = run.rank_bound
    else:
        bound = chain_bound({p: (work[p], chains[p]) for p in mine}, len(lanes))
    return SweepReport(options.model, device, options, results, complete, time.monotonic() - started,
                       engine.stats, cache_path, str(jpath), stopped, split=split, lanes=lanes, units=units,
                       balance_bound=bound)


class _Run:
    """One process's share of a sweep: its buckets, the lanes' scheduler, what they settled."""

    def __init__(self, options: SweepOptions, plans: dict[Problem, ProblemPlan], engine: Engine, progress: Progress,
                 done: Mapping[tuple[str, int], Mapping[str, Any]], write: Callable[[Problem, list[BucketResult]], None]):
        self.options, self.plans, self.engine, self.progress, self.done = options, plans, engine, progress, done
        self._write = write
        self.chains: dict[Problem, list[Bucket]] = {}  # the problems this process settles
        self.settled_on: dict[tuple[str, int], str] = {}
        self.screened_on: dict[tuple[str, int], set[str]] = {}
        self.lost_rank = False  # torchrun: a rank vanished before the screens were exchanged
        self.rank_bound: float | None = None
        self._lock = threading.Lock()

    def buckets(self, problems: Sequence[Problem], *, settle: bool,
                mine: Mapping[tuple[Problem, int], list[KernelConfig]] | None = None,
                screened: Mapping[tuple[str, int], Mapping[KernelConfig, Outcome]] | None = None) -> list[Bucket]:
        """Every bucket of ``problems``, bucket-major (every problem's smallest bucket first, problems
        in the given order). ``mine``: the screen configs this process measures per bucket (None:
        all); ``screened``: outcomes measured elsewhere; ``settle``: this process settles them."""
        tokens = self.options.tokens
        made = []
        for problem in problems:
            screen = self.plans[problem].screen
            chain: list[Bucket] = []
            for t in tokens:
                record = self.done.get((problem.key, t))
                previous = chain[-1] if chain else None
                if record is not None:  # journalled by this or an earlier run: nothing to measure
                    bucket = Bucket(problem, t, screen[t], settle_here=settle, mine=[], previous=previous)
                    bucket.result = BucketResult.from_dict(problem, record)
                else:
                    bucket = Bucket(problem, t, screen[t], settle_here=settle,
                                    mine=None if mine is None else mine.get((problem, t), []), previous=previous,
                                    screened=dict((screened or {}).get((problem.key, t), {})))
                chain.append(bucket)
            if settle:
                self.chains[problem] = chain
            made.append(chain)
        return [chain[i] for i in range(len(tokens)) for chain in made]

    def phase(self, buckets: list[Bucket]) -> None:
        """Compile, screen and settle ``buckets`` on this process's lanes."""
        policy = self.options.policy
        # Compiles go problem by problem, each in its plan's order (the default, then the buckets'
        # rankings round-robin): a problem's config is screened in most of its buckets, so the
        # lanes spread over one problem's buckets get ~5 screens per compile, where compiling
        # bucket by bucket gave them ~1 and left 4 GPUs waiting on the compile pool.
        for problem in dict.fromkeys(b.problem for b in buckets):
            plan = self.plans[problem]
            wanted: set[KernelConfig] = set()
            for bucket in buckets:
                if bucket.problem is not problem or bucket.settled:
                    continue
                # A resumed journal answers what it holds without a kernel: nothing to compile.
                wanted.update(c for c in bucket.todo if not self.engine.answered(problem, bucket.tokens, "screen", c))
                if bucket.settle_here:
                    ok = [c for c, o in bucket.screened.items() if o.ok]
                    wanted.update(sorted(ok, key=lambda c: (bucket.screened[c].median_ms, c))[: policy.finalists])
                    wanted.add(plan.default)
            known = [c for c in dict.fromkeys([plan.default, *plan.compile]) if c in wanted]
            self.engine.precompile(problem, known + sorted(wanted - set(known)))
        scheduler = Scheduler(buckets, measure=self._measure, settle=self._settle, compiled=self.engine.compiled,
                              on_settled=self._settled, stops=(BudgetExhausted,), idle=self.engine.check_budget)
        self.engine.on_compiled = scheduler.wake
        try:
            scheduler.run(self.engine.lanes)
        finally:
            self.engine.on_compiled = None

    def _measure(self, lane: "Lane", problem: Problem, tokens: int, cfg: KernelConfig) -> Outcome:
        with self._lock:
            self.screened_on.setdefault((problem.key, tokens), set()).add(lane.name)
        return lane.measure(problem, tokens, cfg, "screen")

    def _settle(self, lane: "Lane", bucket: Bucket) -> BucketResult:
        problem, tokens = bucket.problem, bucket.tokens
        self.engine.check_budget()
        for cfg in bucket.screen:  # a screen outcome no rank sent (never, unless a journal was edited)
            if cfg not in bucket.screened:
                bucket.screened[cfg] = lane.measure(problem, tokens, cfg, "screen")
        previous = bucket.previous.result if bucket.previous is not None else None
        plan = self.plans[problem]
        result = settle_bucket(problem, tokens, bucket.screen, bucket.screened, plan.default, lane,
                               self.options.policy, seeds=_seeds([previous] if previous else []))
        self.engine.record({"type": "bucket", "problem": problem.key, "tokens": tokens, "result": result.to_dict()})
        with self._lock:
            self.settled_on[(problem.key, tokens)] = lane.name
        return result

    def _settled(self, bucket: Bucket) -> None:
        chain = self.chains[bucket.problem]
        if all(b.settled for b in chain):
            self.progress.finish_problem(bucket.problem)
            self._write(bucket.problem, [b.result for b in chain])

    def results(self) -> dict[Problem, list[BucketResult]]:
        """Per problem this process settles, its settled buckets (a prefix of the buckets: settles chain)."""
        out = {}
        for problem, chain in self.chains.items():
            settled = [b.result for b in chain if b.settled]
            if settled:
                out[problem] = settled
        return out


def run_ranked(run: _Run, gather, problems: list[Problem], costs: Mapping[Problem, Mapping[int, tuple[float, float]]]
               ) -> str | None:
    """A torchrun rank's share, in two phases (``distribute``): the screens, split by (problem,
    slice of its compile list) so that each config compiles on one rank only; an exchange of every
    screen outcome (``all_gather_object``); the settles, split by problem (each problem's chain on
    one rank). Returns why it stopped early, or None."""
    from moe_tune.tuning.distribute import assign, screen_slices

    rank, world = gather.launch.rank, gather.launch.world_size
    tokens = run.options.tokens
    units: dict[tuple[str, int], tuple[Problem, list[KernelConfig]]] = {}
    unit_costs: dict[tuple[str, int], float] = {}
    for problem in problems:
        plan = run.plans[problem]
        open_ = [t for t in tokens if (problem.key, t) not in run.done]
        screened = [c for c in plan.compile if any(c in plan.screen[t] for t in open_)]
        for i, part in enumerate(screen_slices(screened)):
            units[(problem.key, i)] = (problem, part)
            unit_costs[(problem.key, i)] = sum(costs[problem][t][0] for t in open_ for c in part if c in plan.screen[t])
    bins = assign(unit_costs, world)
    mine: dict[tuple[Problem, int], list[KernelConfig]] = {}
    for key in bins[rank]:
        problem, part = units[key]
        for t in tokens:
            mine.setdefault((problem, t), []).extend(c for c in run.plans[problem].screen[t] if c in part)
    phase1 = run.buckets(problems, settle=False, mine=mine)
    stopped = None
    try:
        run.phase(phase1)
    except BudgetExhausted as exc:
        stopped = f"{exc}; rerun with --resume to finish"
    own = {(b.problem.key, b.tokens): dict(b.screened) for b in phase1 if b.screened}
    payloads = gather.exchange({"rank": rank, "screens": own, "stopped": stopped})
    if payloads is None:
        run.lost_rank = True
        return ("a rank stopped before the ranks exchanged their screens (each rank's journal keeps its "
                "measurements): rerun with --resume to finish")
    halted = [(p["rank"], p["stopped"]) for p in payloads if p["stopped"]]
    if halted:
        return stopped or f"rank {halted[0][0]}: {halted[0][1]}"
    screened: dict[tuple[str, int], dict[KernelConfig, Outcome]] = {}
    for payload in payloads:
        for key, outcomes in payload["screens"].items():
            screened.setdefault(key, {}).update(outcomes)
    chains = {p: sum(costs[p][t][1] for t in tokens if (p.key, t) not in run.done) for p in problems}
    owners = assign(chains, world)
    ours = [p for p in problems if p in owners[rank]]
    # The phases run one after the other: each lasts as long as its most loaded rank.
    longest = (max(sum(unit_costs[k] for k in b) for b in bins) + max(sum(chains[p] for p in b) for b in owners))
    total = sum(unit_costs.values()) + sum(chains.values())
    run.rank_bound = total / (world * longest) if longest > 0 else 1.0
    run.phase(run.buckets(ours, settle=True, screened=screened))
    return None


def sweep_command(options: SweepOptions) -> str:
    """The resolved options as a ``moe-tune sweep`` command line (the cache's provenance)."""
    import shlex

    spec = options.model
    if "preset" in spec.details:
        parts = ["--model", spec.details["preset"]]
        for flag in ("ep", "tp"):
            if spec.details.get(flag, 1) > 1:
                parts += [f"--{flag}", str(spec.details[flag])]
    else:  # a config.json path means nothing on another machine: record the per-rank shape
        s = spec.shape
        parts = ["--shape", f"E={s.E},H={s.H},I={s.I},topk={s.topk}"]
    parts += ["--tokens", ",".join(map(str, options.tokens)), "--passes", ",".join(options.passes),
              "--gemms", ",".join(options.gemms), "--dtype", options.dtype, "--routing", str(options.routing),
              "--space", options.space, "--seed", str(options.seed)]
    for flag, on in (("--exhaustive", options.exhaustive), ("--interpret", options.interpret)):
        if on:
            parts.append(flag)
    return shlex.join(["moe-tune", "sweep", *parts])


def _seeds(previous: list[BucketResult]) -> list[KernelConfig]:
    """The previous bucket's winner and runner-up."""
    if not previous or not previous[-1].careful:
        return []
    return [t.config for t in previous[-1].careful[:2]]


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
