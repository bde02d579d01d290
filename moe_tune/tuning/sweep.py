"""``moe-tune sweep``'s engine: a model's problems × token buckets → tuned configs in the cache.

Data flow of ``run_sweep(options)``:

1. the device (``query_device``; Triton's interpreter with ``interpret``), the problems
   (``MoeShape.problems`` filtered by pass and GEMM) and one ``search.ProblemPlan`` each;
2. the journal (``journal.Journal``, ``<cache dir>/journals/``), resumed or fresh;
3. an ``Engine``: a compile pool (``workers.WorkerPool``, CPU cores − 2 processes) warms
   Triton's on-disk cache with every problem's compile list, submitted up front so timing
   starts as soon as the first candidates are built; one timing worker
   (``workers.WorkerProcess``) gates and times candidates one at a time, each with a timeout;
   every outcome is journalled (fsynced) before the search sees it, and a resumed journal answers
   the measurements it already holds;
4. per problem, per bucket in ascending order: ``search.search_bucket``, seeded with the previous
   bucket's winner and runner-up; the result is journalled; after each problem its buckets are
   merged into the cache file (``cache.CacheStore``: locked, merged, provenance filled in);
5. a ``SweepReport`` (the CLI prints it as a table or JSON).

``budget_s`` stops the sweep before the next measurement once the wall clock passes it;
finished buckets are written and ``--resume`` carries on from the journal.
"""

from __future__ import annotations

import math
import os
import re
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

from moe_tune import __version__
from moe_tune.device import INTERPRETER_DEVICE, DeviceInfo
from moe_tune.errors import InvalidInputError, MoeTuneError
from moe_tune.models import ModelSpec
from moe_tune.problem import DTYPE_BYTES, DTYPES, PASSES, KernelConfig, Problem
from moe_tune.space import SPACES
from moe_tune.tuning.journal import Journal
from moe_tune.tuning.search import (
    BucketResult,
    ProblemPlan,
    SearchPolicy,
    measurements_planned,
    plan_problem,
    policy_for,
    search_bucket,
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
        }


def _compile_workers(requested: int | None, interpreter: bool, problems: list[Problem]) -> int:
    if requested is not None:
        return max(0, requested)
    if interpreter:
        return 0  # nothing to compile: the interpreter runs the Python source
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 2
    count = max(1, min(16, cores - 2))  # leave a core to the timing worker and one to this process
    # Each compile worker allocates the problem's weight tensor (never read) and a CUDA context.
    import torch

    free, _ = torch.cuda.mem_get_info()
    per_worker = max(p.E * p.N * p.K * DTYPE_BYTES[p.dtype] for p in problems) + (600 << 20)
    return max(1, min(count, int(0.4 * free // per_worker)))


class Engine:
    """Compile pool + timing worker + journal memo; an ``Evaluator`` for ``search_bucket``."""

    def __init__(self, device: DeviceInfo, *, routing: RoutingSpec, seed: int, buckets: tuple[int, ...],
                 candidate_timeout_s: float = DEFAULT_CANDIDATE_TIMEOUT_S, compile_workers: int = 0,
                 faults: Mapping[str, str] | None = None, journal: Journal | None = None,
                 deadline: float | None = None, on_measure: Callable[[], None] | None = None):
        from moe_tune.tuning.workers import WorkerPool, WorkerProcess

        self.device = device
        self.routing, self.seed, self.buckets = routing, seed, buckets
        self.timeout = candidate_timeout_s
        self.journal = journal
        self.deadline = deadline
        self.on_measure = on_measure
        self.stats = EngineStats()
        self.worker = WorkerProcess(faults=faults, name="moe-tune-timing")
        self.pool = WorkerPool(compile_workers, faults=faults) if compile_workers > 0 else None
        self.stats.compile_workers = compile_workers
        self._compile_started: float | None = None
        self._compile_finished: list[float] = []
        self._compiles: dict[tuple[str, KernelConfig], Future] = {}
        self._compile_errors: dict[tuple[str, KernelConfig], str] = {}
        self._memo: dict[tuple[str, int, str, str], Outcome] = {}
        if journal is not None:
            for record in journal.of_type("measure"):
                key = (record["problem"], record["tokens"], record["stage"], record["config_short"])
                self._memo[key] = Outcome.from_dict(record["outcome"])
            for record in journal.of_type("compile"):
                if not record.get("ok"):
                    cfg = KernelConfig.from_dict(record["config"])
                    self._compile_errors[(record["problem"], cfg)] = record.get("error") or "compile failed"

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close(cancel_pending=True)
            self.stats.worker_restarts += self.pool.restarts
            self.pool = None
        if self._compile_started is not None and self._compile_finished:
            self.stats.compile_wall_s = max(self._compile_finished) - self._compile_started
        self.stats.worker_restarts += self.worker.restarts
        self.worker.close()

    def start(self) -> None:
        """Start the timing worker now (it imports torch and creates a CUDA context: seconds)."""
        self.worker.start()

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
            future.add_done_callback(lambda f: f.cancelled() or self._compile_finished.append(time.monotonic()))
            self._compiles[key] = future

    def _compile_error(self, problem: Problem, cfg: KernelConfig) -> str | None:
        key = (problem.key, cfg)
        if key in self._compile_errors:
            return self._compile_errors[key]
        future = self._compiles.pop(key, None)
        if future is None:
            return None
        remaining = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
        try:
            reply = future.result(timeout=remaining)
        except FutureTimeout:
            raise BudgetExhausted("the time budget ran out while candidates were compiling") from None
        except Exception as exc:  # the pool could not start a worker: compile in the timing worker
            reply = {"ok": True, "seconds": 0.0, "note": f"precompile unavailable: {exc}"}
        self.stats.compiles += 1
        self.stats.compile_seconds += float(reply.get("seconds", 0.0))
        error = None if reply.get("ok") else (reply.get("error") or "compile failed")
        if self.journal is not None:
            self.journal.append({"type": "compile", "problem": problem.key, "config": cfg.to_dict(),
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
        key = (problem.key, tokens, stage, cfg.short())
        if key in self._memo:
            self.stats.replayed += 1
            if self.on_measure:
                self.on_measure()
            return self._memo[key]
        self.check_budget()
        compile_error = self._compile_error(problem, cfg)
        if compile_error is not None:
            outcome = Outcome.failed(f"compile failed: {compile_error}")
        else:
            request = {"op": "measure", "problem": problem.to_dict(), "tokens": tokens,
                       "routing": {"kind": self.routing.kind, "skew": self.routing.skew, "path": self.routing.path},
                       "seed": self.seed, "config": cfg.to_dict(), "stage": stage}
            outcome = Outcome.from_dict(self.worker.call(request, self.timeout))
        self.stats.measurements += 1
        if not outcome.ok:
            self.stats.failures += 1
        elif outcome.first_launch_ms is not None:
            self.stats.first_launch_ms.append(outcome.first_launch_ms)
        if self.journal is not None:
            self.journal.append({"type": "measure", "problem": problem.key, "tokens": tokens, "stage": stage,
                                 "config_short": cfg.short(), "config": cfg.to_dict(), "outcome": outcome.to_dict()})
        self._memo[key] = outcome
        if self.on_measure:
            self.on_measure()
        return outcome


# ---------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------


class Progress(Protocol):
    """Where the sweep reports progress (the CLI draws rich progress bars on stderr)."""

    def start_problem(self, problem: Problem, total: int) -> None: ...
    def advance(self) -> None: ...
    def set_completed(self, done: int) -> None: ...
    def finish_problem(self, problem: Problem) -> None: ...
    def note(self, message: str) -> None: ...


class _Silent:
    def start_problem(self, problem: Problem, total: int) -> None:
        pass

    def advance(self) -> None:
        pass

    def set_completed(self, done: int) -> None:
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


def journal_path(cache_dir: Path, model: ModelSpec, device: DeviceInfo, dtype: str) -> Path:
    return cache_dir / "journals" / f"sweep-{_slug(model.name)}-{dtype}-{device.slug}.jsonl"


def run_sweep(options: SweepOptions, progress: Progress | None = None) -> SweepReport:
    """Tune ``options.model``'s problems on this device (module docstring)."""
    from moe_tune.cache import paths

    started = time.monotonic()
    options = options.resolved()
    progress = progress or _Silent()
    device = detect_device(options.interpret)
    problems = select_problems(options)
    plans = {p: plan_problem(p, device, options.space, options.tokens, options.policy) for p in problems}
    cache_dir = paths.default_store_dir(options.cache_dir)
    jpath = journal_path(cache_dir, options.model, device, options.dtype)
    journal = Journal.open(jpath, journal_settings(options, device, problems), resume=options.resume)
    done = {(r["problem"], r["tokens"]): r["result"] for r in journal.of_type("bucket")}
    deadline = started + options.budget_s if options.budget_s else None
    results: dict[Problem, list[BucketResult]] = {}
    cache_path = None
    stopped = None
    engine = Engine(device, routing=options.routing, seed=options.seed, buckets=options.tokens,
                    candidate_timeout_s=options.candidate_timeout_s,
                    compile_workers=_compile_workers(options.compile_workers, options.interpret, problems)
                    if any((p.key, t) not in done for p in problems for t in options.tokens) else 0,
                    faults=options.faults, journal=journal, deadline=deadline, on_measure=progress.advance)
    try:
        for problem in problems:
            if any((problem.key, t) not in done for t in options.tokens):
                engine.precompile(problem, plans[problem].compile)
        for problem in problems:
            plan = plans[problem]
            planned = measurements_planned(plan, options.policy)
            progress.start_problem(problem, sum(planned.values()))
            buckets: list[BucketResult] = []
            results[problem] = buckets
            try:
                for tokens in options.tokens:
                    record = done.get((problem.key, tokens))
                    if record is not None:
                        result = BucketResult.from_dict(problem, record)
                    else:
                        engine.check_budget()
                        result = search_bucket(problem, tokens, plan.screen[tokens], plan.default, engine,
                                               options.policy, seeds=_seeds(buckets))
                        journal.append({"type": "bucket", "problem": problem.key, "tokens": tokens,
                                        "result": result.to_dict()})
                    buckets.append(result)
                    progress.set_completed(sum(planned[t] for t in options.tokens if t <= tokens))
                progress.finish_problem(problem)
            finally:
                if options.write_cache and any(b.ok for b in buckets):
                    cache_path = str(write_results(cache_dir, device, problem, buckets, time.monotonic() - started,
                                                   sweep_command(options)))
    except BudgetExhausted as exc:
        stopped = f"{exc}; rerun with --resume to finish"
        progress.note(stopped)
    finally:
        engine.close()
        journal.close()
    complete = stopped is None and all(len(results.get(p, [])) == len(options.tokens) for p in problems)
    return SweepReport(options.model, device, options, results, complete, time.monotonic() - started,
                       engine.stats, cache_path, str(jpath), stopped)


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
