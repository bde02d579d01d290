"""What a worker process does with one request (``protocol``): gate and time a candidate config, time
a challenger against the heuristic default head to head, or compile a candidate without
launching it. Runs inside the worker processes of ``workers``, never in the sweep's own process.

Data flow of ``Bench.measure(request)``:

1. the bucket's ``cases.Case`` (inputs, routing, float reference), kept for the worker's last
   ``MAX_CASES`` buckets;
2. gate — the candidate writes into a NaN-poisoned output buffer; a relative error above
   ``GATE_TOLERANCE[dtype]`` (NaN anywhere counts as infinite) fails the candidate, so its time
   never counts and a wrong config is never written;
3. timing — ``moe_tune.timer.GpuTimer``, the one GPU timer (``do_bench`` samples of a CUDA-graph
   replay, L2 flushed before each), as many samples as the stage's ``LaunchPlan`` allows; the
   median and the p20–p80 spread. Under Triton's interpreter the time is the wall clock of the
   launch: meaningless as a number, but the pipeline runs the same way.

``Bench.versus`` gates the challenger and the default and times them in interleaved rounds
(``versus.head_to_head``), one ``Outcome`` each. ``Bench.precompile`` is the compile workers' job:
it calls the same launcher on a tiny token count with the kernels swapped for ``kernel.warmup``
(compile into Triton's on-disk cache, launch nothing), so the timing worker later loads the binary
instead of compiling it. The tiny token count keeps Triton's integer specialisation (divisibility
by 16, equality to 1) of the real buckets, or the compiled binary would not be the one the timing
run looks up.

Every launch goes through ``Bench.launch``: a subclass that changes it (or ``handle``) changes
what a worker does with a candidate, which is how the tests make candidates crash, hang or
compute wrong results (``workers.WorkerProcess(bench=...)``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Mapping

from moe_tune.problem import KernelConfig, Problem
from moe_tune.timer import GpuTimer, WallTimer, summarise
from moe_tune.tuning.cases import Case
from moe_tune.tuning.protocol import Outcome, Versus
from moe_tune.tuning.routing_spec import RoutingSpec
from moe_tune.tuning.versus import head_to_head

GATE_TOLERANCE = {"bfloat16": 1e-2, "float16": 5e-3, "float32": 5e-3}  # float32 runs the MMA in TF32


@dataclass(frozen=True)
class LaunchPlan:
    """How many launches one timing takes: enough to fill ``target_ms``, within bounds."""

    target_ms: float
    min_launches: int
    max_launches: int

    def launches(self, estimate_ms: float) -> int:
        if estimate_ms <= 0:
            return self.max_launches
        return max(self.min_launches, min(self.max_launches, math.ceil(self.target_ms / estimate_ms)))

    def gpu_timer(self) -> GpuTimer:
        # No warm-up beyond do_bench's own runs: the gate launch and the graph capture came first.
        return GpuTimer(warmup_ms=0.0, rep_ms=self.target_ms, min_samples=self.min_launches,
                        max_samples=self.max_launches, graph=True)


# Screen: ~25 ms a candidate is ±1-2% on an H100 for kernels above 50 µs. Careful re-timing of
# the handful of finalists: ~100 ms each, enough to rank them; the head to head against the default
# has the last word, ~20 ms per config and round over 4 rounds. Together they cost about the GPU
# time that 150 ms careful timings without a head to head did (estimated from the shipped H200
# cache's kernel times): the default sweep must stay within 2 minutes on one GPU.
GPU_PLANS = {"screen": LaunchPlan(25.0, 3, 20), "careful": LaunchPlan(100.0, 10, 60),
             "versus": LaunchPlan(20.0, 4, 20)}
# Interpreted launches take 0.05-1 s each and their time means nothing: the fewest that exercise
# the code.
INTERPRETER_PLANS = {"screen": LaunchPlan(0.0, 1, 1), "careful": LaunchPlan(0.0, 2, 2),
                     "versus": LaunchPlan(0.0, 1, 1)}


def plan_for(stage: str, interpreter: bool) -> LaunchPlan:
    """``screen``, ``versus`` (one round), or ``careful`` for the careful and tie stages."""
    plans = INTERPRETER_PLANS if interpreter else GPU_PLANS
    return plans[stage if stage in ("screen", "versus") else "careful"]


def tiny_tokens(buckets: list[int], topk: int) -> list[int]:
    """Small token counts that Triton specialises like ``buckets``: the launch's integer
    arguments that depend on T are T (gathered rows) and M = T·k, specialised on ``% 16 == 0``
    and ``== 1``. One representative per class present in ``buckets``."""

    def klass(t: int) -> tuple[bool, ...]:
        return (t % 16 == 0, t * topk % 16 == 0, t == 1, t * topk == 1)

    wanted = {klass(t) for t in buckets}
    out = []
    for t in range(1, 65):
        if klass(t) in wanted:
            out.append(t)
            wanted.discard(klass(t))
    return out


# A worker keeps the inputs of its last few (problem, bucket)s: the sweep's scheduler moves a lane
# between buckets while compiles land, and rebuilding a case (random inputs, routing, a float32
# reference: ~3.5 GB for up-projection forward at 32k tokens) costs more than a screen measurement.
# The memory cap keeps room for the candidates' outputs and for the largest bucket's case.
MAX_CASES = 8
CASE_MEMORY_FRACTION = 0.3


class Bench:
    """The state a worker keeps between requests: the device and its recent cases.
    ``handle(request)`` is the worker's whole protocol."""

    def __init__(self):
        import torch

        from moe_tune.device import interpreting

        self.interpreter = interpreting() and not torch.cuda.is_available()
        self.device = torch.device("cpu" if self.interpreter else "cuda")
        self._cases: dict[tuple, Case] = {}  # least recently used first
        self._case_ms: float | None = None
        self._compile_case: Case | None = None
        self._compile_key: tuple | None = None
        if not self.interpreter:
            torch.backends.cuda.matmul.allow_tf32 = False  # the float32 reference must be exact

    def handle(self, request: Mapping[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "ping":
            return {"ok": True, "device": str(self.device), "pid": os.getpid()}
        if op == "measure":
            return self.measure(request)
        if op == "versus":
            return self.versus(request)
        if op == "compile":
            return self.precompile(request)
        return {"ok": False, "error": f"unknown request {op!r}"}

    def launch(self, case: Case, cfg: KernelConfig, out=None):
        """One launch of ``cfg`` on ``case`` (every gate and timing launch comes through here)."""
        return case.launch(cfg, out)

    # -- measure ----------------------------------------------------------------------------------

    def measure(self, request: Mapping[str, Any]) -> dict[str, Any]:
        cfg = KernelConfig.from_dict(request["config"])
        try:
            case = self._get_case(request)
            outcome = self._measure(case, cfg, request.get("stage", "screen"))
            outcome = dataclasses.replace(outcome, case_ms=self._case_ms)
        except Exception as exc:  # a candidate may fail in any way; the sweep records why
            return self._failure(exc)
        return outcome.to_dict()

    def versus(self, request: Mapping[str, Any]) -> dict[str, Any]:
        configs = [KernelConfig.from_dict(request["config"]), KernelConfig.from_dict(request["default"])]
        try:
            case = self._get_case(request)
            timer = self._timer(plan_for("versus", self.interpreter))
            runs, outcomes, launches = {}, [None, None], []
            for i, cfg in enumerate(configs):
                out, _, outcomes[i] = self._gate(case, cfg)
                if outcomes[i] is None:  # passed the gate: warm and, on a GPU, captured once for every round
                    # The launch (and the output buffer it holds) lives as long as the rounds do: a
                    # captured graph keeps writing to ``out``, and a buffer the allocator had
                    # handed back faulted with an illegal address (H100 sweep, 2026-11-27).
                    launches.append(lambda cfg=cfg, out=out: self.launch(case, cfg, out))
                    runs[i] = timer.prepare(launches[-1])
            live = sorted(runs)
            samples = head_to_head([runs[i] for i in live], timer.run_samples, int(request.get("rounds", 1)))
            for i, times in zip(live, samples):
                outcomes[i] = Outcome.timed(summarise(times), rel_error=case.gated[configs[i]])
        except Exception as exc:
            return self._failure(exc)
        return Versus(*outcomes).to_dict()

    def _failure(self, exc: Exception) -> dict[str, Any]:
        outcome = Outcome.failed(f"{type(exc).__name__}: {str(exc).strip()[:500]}")
        if not self._healthy():
            # A sticky CUDA error (illegal address, ...) poisons the context: reply, then the
            # worker exits and the parent starts a fresh one.
            return {**outcome.to_dict(), "fatal": True}
        return outcome.to_dict()

    def _get_case(self, request: Mapping[str, Any]) -> Case:
        problem = Problem.from_dict(request["problem"])
        tokens = int(request["tokens"])
        routing = RoutingSpec(**request["routing"])
        seed = int(request["seed"])
        key = (problem, tokens, routing, seed)
        case = self._cases.pop(key, None)
        self._case_ms = None
        if case is None:
            while self._cases and (len(self._cases) >= MAX_CASES or self._memory_full()):
                del self._cases[next(iter(self._cases))]
                self._release()
            start = time.perf_counter()
            case = Case(problem, tokens, routing, seed, self.device)
            self._sync()
            self._case_ms = (time.perf_counter() - start) * 1e3
        self._cases[key] = case
        return case

    def _memory_full(self) -> bool:
        if self.interpreter:
            return False
        import torch

        return torch.cuda.memory_allocated(self.device) > CASE_MEMORY_FRACTION * torch.cuda.get_device_properties(
            self.device).total_memory

    def _release(self) -> None:
        if not self.interpreter:
            import torch

            torch.cuda.empty_cache()

    def _healthy(self) -> bool:
        if self.interpreter:
            return True
        import torch

        try:
            torch.cuda.synchronize()
            torch.zeros(1, device=self.device).add_(1).item()
            return True
        except Exception:
            return False

    def _gate(self, case: Case, cfg: KernelConfig) -> tuple[Any, float | None, Outcome | None]:
        """(an output buffer for ``cfg``, its gate launch's milliseconds, None) once ``cfg`` passed
        the gate on ``case``, or (None, None, the failed ``Outcome``). A config's first launch on a
        case is its gate; later requests reuse the verdict (first launch: None)."""
        from moe_tune.device import query_device
        from moe_tune.space import check_config

        check_config(case.problem, cfg, query_device(case.device))
        out = case.new_output()  # NaN-poisoned: a skipped write cannot pass
        if cfg in case.gated:
            return out, None, None
        start = time.perf_counter()
        result = self.launch(case, cfg, out)
        self._sync()
        first_ms = (time.perf_counter() - start) * 1e3
        rel = _relative_error(result, case.reference)
        tol = GATE_TOLERANCE[case.problem.dtype]
        if not rel <= tol:
            return None, None, Outcome.failed(f"wrong result: relative error {rel:.3g} > {tol:g}",
                                              rel_error=rel if math.isfinite(rel) else None, first_launch_ms=first_ms)
        case.gated[cfg] = rel
        return out, first_ms, None

    def _measure(self, case: Case, cfg: KernelConfig, stage: str) -> Outcome:
        out, first_ms, failed = self._gate(case, cfg)
        if failed is not None:
            return failed
        timer = self._timer(plan_for(stage, self.interpreter))
        samples = timer.samples(lambda: self.launch(case, cfg, out))
        return Outcome.timed(summarise(samples), rel_error=case.gated[cfg], first_launch_ms=first_ms)

    def _timer(self, plan: LaunchPlan):
        # Under the interpreter the gate launch was the warm-up: every interpreted launch costs
        # 0.05-1 s of CI time.
        return WallTimer(plan.min_launches, warm_up=False) if self.interpreter else plan.gpu_timer()

    def _sync(self) -> None:
        if not self.interpreter:
            import torch

            torch.cuda.synchronize()

    # -- precompile -------------------------------------------------------------------------------

    def precompile(self, request: Mapping[str, Any]) -> dict[str, Any]:
        from moe_tune.ops import launch

        problem = Problem.from_dict(request["problem"])
        cfg = KernelConfig.from_dict(request["config"])
        buckets = [int(t) for t in request["tokens"]]
        start = time.perf_counter()
        try:
            for tokens in tiny_tokens(buckets, problem.topk):
                key = (problem, tokens)
                if self._compile_case is None or self._compile_key != key:
                    self._compile_case = None
                    self._compile_case = Case(problem, tokens, RoutingSpec(), 0, self.device, compile_only=True)
                    self._compile_key = key
                with launch.compile_only():
                    self.launch(self._compile_case, cfg)
        except Exception as exc:
            return {"ok": False, "error": f"{type(exc).__name__}: {str(exc).strip()[:500]}",
                    "seconds": time.perf_counter() - start}
        return {"ok": True, "seconds": time.perf_counter() - start}


def _relative_error(out, ref) -> float:
    from moe_tune.reference import relative_error

    return relative_error(out, ref)
