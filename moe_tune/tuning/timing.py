"""One candidate on one (problem, token bucket): inputs, correctness gate, timing. Runs inside
the worker processes of ``moe_tune.tuning.workers``, never in the sweep's own process.

Data flow of ``Bench.measure(request)``:

1. ``Case`` — the bucket's inputs, built once per (problem, tokens, routing, seed) from seeded
   generators (so a resumed sweep re-creates them exactly): top-k expert ids from the routing
   spec, random activations and weights, the routing weights, and the float reference
   (``moe_tune.reference``, float32 on a GPU with TF32 off, float64 on the CPU);
2. gate — the candidate writes into a NaN-poisoned output buffer; a relative error above
   ``GATE_TOLERANCE[dtype]`` (NaN anywhere counts as infinite) fails the candidate, so its time
   never counts and a wrong config is never written;
3. timing — on a GPU, CUDA events around each launch with L2 flushed before it (a write over
   twice the L2 size), the launch replayed from a CUDA graph when it can be captured (the Python
   launcher costs ~100 µs of CPU, more than a small kernel's run time, so eager launches would
   leave gaps that the events would count); the median and the p20–p80 spread of the samples.
   Under Triton's interpreter the time is the wall clock of the launch: meaningless as a number,
   but the pipeline runs the same way.

``Bench.precompile`` is the compile workers' job: it calls the same launcher on a tiny token count
with the kernels swapped for ``kernel.warmup`` (compile into Triton's on-disk cache, launch
nothing), so the timing worker later loads the binary instead of compiling it. The tiny token
count keeps Triton's integer specialisation (divisibility by 16, equality to 1) of the real
buckets, or the compiled binary would not be the one the timing run looks up.

Test hook: ``faults`` maps a config's ``short()`` to ``corrupt`` (the gate sees a perturbed
output), ``raise``, ``crash`` (the process exits mid-candidate) or ``hang``.
"""

from __future__ import annotations

import dataclasses

import contextlib
import hashlib
import inspect
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping

from moe_tune.errors import InvalidInputError
from moe_tune.problem import KernelConfig, Problem

GATE_TOLERANCE = {"bfloat16": 1e-2, "float16": 5e-3, "float32": 5e-3}  # float32 runs the MMA in TF32

FAULT_KINDS = ("corrupt", "raise", "crash", "hang")


# ---------------------------------------------------------------------------------------------
# Routing specs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoutingSpec:
    """How tokens are spread over experts while tuning: ``uniform`` (random router logits →
    top-k), ``zipf:S`` (logits biased by −S·log(rank): a skewed router) or ``trace:FILE`` (recorded
    top-k ids, a ``.pt`` or ``.npy`` of int ``[T, k]``; buckets take its first T rows, cycling)."""

    kind: str = "uniform"
    skew: float = 0.0
    path: str | None = None

    def __str__(self) -> str:
        if self.kind == "zipf":
            return f"zipf:{self.skew:g}"
        if self.kind == "trace":
            return f"trace:{self.path}"
        return "uniform"

    @classmethod
    def parse(cls, text: str) -> "RoutingSpec":
        kind, _, arg = text.strip().partition(":")
        if kind == "uniform" and not arg:
            return cls()
        if kind == "zipf":
            try:
                skew = float(arg)
            except ValueError:
                skew = -1.0
            if not math.isfinite(skew) or skew <= 0:
                raise InvalidInputError(f"--routing zipf:S needs a positive exponent S, got {arg!r}")
            return cls("zipf", skew=skew)
        if kind == "trace" and arg:
            return cls("trace", path=os.path.abspath(os.path.expanduser(arg)))
        raise InvalidInputError(f"--routing takes uniform, zipf:S or trace:FILE; got {text!r}")

    def identity(self) -> str:
        """What the sweep journal compares on --resume: a trace counts by its content."""
        if self.kind != "trace":
            return str(self)
        with open(self.path, "rb") as f:
            return f"trace:sha256={hashlib.sha256(f.read()).hexdigest()[:16]}"

    def load_trace(self, num_experts: int, topk: int):
        """The trace's ids as an int64 ``[T, k]`` CPU tensor, validated against the shape."""
        import torch

        path = self.path
        try:
            if path.endswith(".npy"):
                try:
                    import numpy
                except ImportError:
                    raise InvalidInputError("reading a .npy trace needs numpy (pip install numpy)") from None
                ids = torch.from_numpy(numpy.load(path, allow_pickle=False))
            else:
                ids = torch.load(path, map_location="cpu", weights_only=True)
        except InvalidInputError:
            raise
        except FileNotFoundError:
            raise InvalidInputError(f"routing trace {path} does not exist") from None
        except Exception as exc:  # torch.load and numpy.load raise a zoo of types on bad files
            raise InvalidInputError(f"cannot read the routing trace {path}: {exc}") from None
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise InvalidInputError(f"routing trace {path} must hold an int tensor [T, k], got "
                                    f"{getattr(ids, 'dtype', type(ids).__name__)} {list(getattr(ids, 'shape', []))}")
        if ids.shape[1] != topk:
            raise InvalidInputError(f"routing trace {path} has k={ids.shape[1]} experts per token, the model has topk={topk}")
        if ids.numel() == 0:
            raise InvalidInputError(f"routing trace {path} is empty")
        ids = ids.long()
        if int(ids.min()) < 0 or int(ids.max()) >= num_experts:
            raise InvalidInputError(f"routing trace {path} holds expert ids outside [0, {num_experts})")
        return ids

    def top_k_ids(self, num_tokens: int, num_experts: int, topk: int, seed: int):
        """``[T, k]`` int64 expert ids on the CPU, the same for the same arguments."""
        import torch

        if self.kind == "trace":
            ids = self.load_trace(num_experts, topk)
            reps = -(-num_tokens // ids.shape[0])
            return ids.repeat(reps, 1)[:num_tokens].contiguous()
        from moe_tune.ops.routing import random_routing

        gen = torch.Generator().manual_seed(seed)
        return random_routing(num_tokens, num_experts, topk, generator=gen, skew=self.skew)


# ---------------------------------------------------------------------------------------------
# Outcomes
# ---------------------------------------------------------------------------------------------


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


def summarise(samples: list[float]) -> tuple[float, float]:
    """(median, p80 − p20) of per-launch times."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    if len(ordered) < 5:
        return statistics.median(ordered), ordered[-1] - ordered[0]
    q = statistics.quantiles(ordered, n=10, method="inclusive")
    return statistics.median(ordered), q[7] - q[1]


@dataclass(frozen=True)
class LaunchPlan:
    """How many launches a stage times: enough to fill ``target_ms``, within bounds."""

    target_ms: float
    min_launches: int
    max_launches: int

    def launches(self, estimate_ms: float) -> int:
        if estimate_ms <= 0:
            return self.max_launches
        return max(self.min_launches, min(self.max_launches, math.ceil(self.target_ms / estimate_ms)))


# Screen: ~25 ms a candidate is ±1-2% on an H100 for kernels above 50 µs; careful re-timing
# takes ~150 ms for the handful of finalists.
GPU_PLANS = {"screen": LaunchPlan(25.0, 3, 20), "careful": LaunchPlan(150.0, 10, 100)}
# Interpreted launches take 0.05-1 s each and their time means nothing: the fewest that exercise
# the code.
INTERPRETER_PLANS = {"screen": LaunchPlan(0.0, 1, 1), "careful": LaunchPlan(0.0, 2, 2)}


def plan_for(stage: str, interpreter: bool) -> LaunchPlan:
    plans = INTERPRETER_PLANS if interpreter else GPU_PLANS
    return plans["screen" if stage == "screen" else "careful"]


# ---------------------------------------------------------------------------------------------
# Inputs of one (problem, bucket)
# ---------------------------------------------------------------------------------------------


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


def case_seed(seed: int, problem: Problem, tokens: int) -> int:
    text = f"{seed}/{problem.key}/{tokens}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:4], "little")


def _launchers_take_out() -> bool:
    from moe_tune.ops import grouped_gemm as gg

    return "out" in inspect.signature(gg.forward).parameters


class Case:
    """Inputs, routing and reference output of one (problem, token bucket) on one device."""

    def __init__(self, problem: Problem, tokens: int, routing_spec: RoutingSpec, seed: int, device,
                 *, with_reference: bool = True, weight_values: bool = True):
        import torch

        from moe_tune.ops.routing import build_routing

        self.problem, self.tokens = problem, tokens
        p = problem
        dtype = getattr(torch, p.dtype)
        seed = case_seed(seed, problem, tokens)
        ids = routing_spec.top_k_ids(tokens, p.E, p.topk, seed)
        self.routing = build_routing(ids.to(device), p.E)
        rows = tokens * p.topk
        gen = torch.Generator(device=device).manual_seed(seed)

        def randn(*shape):
            return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)

        self.weights = None
        if p.weighted:
            self.weights = torch.rand(rows, generator=gen, device=device, dtype=torch.float32).to(dtype)
        fwd_rows = tokens if p.gather else rows
        self.w = self.x = self.dy = None
        if p.pass_ in ("forward", "dx"):
            # Compile workers never read the weights: an uninitialised tensor is enough there.
            self.w = randn(p.E, p.N, p.K) if weight_values else torch.empty(p.E, p.N, p.K, dtype=dtype, device=device)
        if p.pass_ in ("forward", "dw"):
            self.x = randn(fwd_rows, p.K)
        if p.pass_ in ("dx", "dw"):
            self.dy = randn(rows, p.N)
        self.out_shape = {"forward": (rows, p.N), "dx": (rows, p.K), "dw": (p.E, p.N, p.K)}[p.pass_]
        self.dtype = dtype
        self.device = torch.device(device)
        self.reference = self._reference() if with_reference else None
        self.gated: dict[KernelConfig, float] = {}

    def _reference(self):
        import torch

        from moe_tune.reference import reference_dw, reference_dx, reference_forward

        p = self.problem
        ref_dtype = torch.float32 if self.device.type == "cuda" else torch.float64
        flags = dict(gather=p.gather, scatter=p.scatter, weights=self.weights, dtype=ref_dtype)
        if p.pass_ == "forward":
            return reference_forward(self.x, self.w, self.routing, **flags)
        if p.pass_ == "dx":
            return reference_dx(self.dy, self.w, self.routing, **flags)
        return reference_dw(self.dy, self.x, self.routing, **flags)

    def new_output(self, fill: float = float("nan")):
        import torch

        return torch.full(self.out_shape, fill, dtype=self.dtype, device=self.device)

    def launch(self, cfg: KernelConfig, out=None):
        """Run ``cfg`` once; ``out`` (``out_shape``) is written in place when the launchers take it."""
        from moe_tune.ops import grouped_gemm as gg

        p = self.problem
        flags = dict(gather=p.gather, scatter=p.scatter, weights=self.weights, config=cfg)
        if out is not None and _launchers_take_out():
            flags["out"] = out
        if p.pass_ == "forward":
            return gg.forward(self.x, self.w, self.routing, **flags)
        if p.pass_ == "dx":
            return gg.backward_dx(self.dy, self.w, self.routing, **flags)
        return gg.backward_dw(self.dy, self.x, (p.E, p.N, p.K), self.routing, **flags)


# ---------------------------------------------------------------------------------------------
# Compile without launching
# ---------------------------------------------------------------------------------------------


class _WarmupOnly:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` compiles, launches nothing."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.kernel.warmup(*args, grid=grid, **kwargs)

    def __getattr__(self, name):
        return getattr(self.kernel, name)


@contextlib.contextmanager
def _kernels_compile_only():
    """Swap the grouped-GEMM kernels for ``_WarmupOnly`` wherever an ops module holds them."""
    from moe_tune.kernels import grouped_mm

    kernels = {id(k): k for k in (grouped_mm.grouped_mm_kernel, grouped_mm.grouped_mm_dw_kernel)}
    swapped = []
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith("moe_tune.ops"):
            continue
        for attr, value in list(vars(module).items()):
            if id(value) in kernels:
                setattr(module, attr, _WarmupOnly(value))
                swapped.append((module, attr, value))
    try:
        yield
    finally:
        for module, attr, value in swapped:
            setattr(module, attr, value)


# ---------------------------------------------------------------------------------------------
# The bench
# ---------------------------------------------------------------------------------------------


# A worker keeps the inputs of its last few (problem, bucket)s: the sweep's scheduler moves a lane
# between buckets while compiles land, and rebuilding a case (random inputs, routing, a float32
# reference: ~3.5 GB for up-projection forward at 32k tokens) costs more than a screen measurement.
# The memory cap keeps room for the candidates' outputs and for the largest bucket's case.
MAX_CASES = 8
CASE_MEMORY_FRACTION = 0.3


class Bench:
    """The state a worker keeps between requests: the device, its recent cases, the L2 flush
    buffer. ``handle(request)`` is the worker's whole protocol."""

    def __init__(self, faults: Mapping[str, str] | None = None):
        import torch

        from moe_tune.device import interpreting

        self.faults = dict(faults or {})
        self.interpreter = interpreting() and not torch.cuda.is_available()
        self.device = torch.device("cpu" if self.interpreter else "cuda")
        self._cases: dict[tuple, Case] = {}  # least recently used first
        self._case_ms: float | None = None
        self._compile_case: Case | None = None
        self._compile_key: tuple | None = None
        self._flush = None
        self._cycles_per_ms = None
        if not self.interpreter:
            torch.backends.cuda.matmul.allow_tf32 = False  # the float32 reference must be exact

    # -- protocol -------------------------------------------------------------------------------

    def handle(self, request: Mapping[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "ping":
            return {"ok": True, "device": str(self.device), "pid": os.getpid()}
        if op == "measure":
            return self.measure(request)
        if op == "compile":
            return self.precompile(request)
        return {"ok": False, "error": f"unknown request {op!r}"}

    def _inject(self, cfg: KernelConfig) -> str | None:
        fault = self.faults.get(cfg.short())
        if fault == "crash":
            os._exit(70)  # what a segfault in the driver looks like from the parent: EOF, no reply
        if fault == "hang":
            time.sleep(10**6)
        if fault == "raise":
            raise RuntimeError(f"injected fault for {cfg.short()}")
        return fault

    # -- measure ----------------------------------------------------------------------------------

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

    def measure(self, request: Mapping[str, Any]) -> dict[str, Any]:
        cfg = KernelConfig.from_dict(request["config"])
        stage = request.get("stage", "screen")
        fault = self._inject(cfg)
        try:
            case = self._get_case(request)
            outcome = self._measure(case, cfg, stage, corrupt=fault == "corrupt")
            outcome = dataclasses.replace(outcome, case_ms=self._case_ms)
        except Exception as exc:  # a candidate may fail in any way; the sweep records why
            outcome = Outcome.failed(f"{type(exc).__name__}: {str(exc).strip()[:500]}")
            if not self._healthy():
                # A sticky CUDA error (illegal address, ...) poisons the context: reply, then the
                # worker exits and the parent starts a fresh one.
                return {**outcome.to_dict(), "fatal": True}
        return outcome.to_dict()

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

    def _measure(self, case: Case, cfg: KernelConfig, stage: str, *, corrupt: bool) -> Outcome:
        from moe_tune.device import query_device
        from moe_tune.space import check_config

        check_config(case.problem, cfg, query_device(case.device))
        take_out = _launchers_take_out()
        out = case.new_output() if take_out else None  # NaN-poisoned: a skipped write cannot pass
        first_ms = None
        if cfg not in case.gated or corrupt:
            if not take_out:
                # A launcher that allocates its own output: free a NaN block of that size first,
                # so the caching allocator hands the poisoned block to the launcher.
                case.new_output()
            start = time.perf_counter()
            result = case.launch(cfg, out)
            self._sync()
            first_ms = (time.perf_counter() - start) * 1e3
            if corrupt:
                result = result * 1.25
            rel = _relative_error(result, case.reference)
            tol = GATE_TOLERANCE[case.problem.dtype]
            if not rel <= tol:
                return Outcome.failed(f"wrong result: relative error {rel:.3g} > {tol:g}", rel_error=_finite(rel),
                                      first_launch_ms=first_ms)
            case.gated[cfg] = rel
        plan = plan_for(stage, self.interpreter)
        if self.interpreter:
            samples = self._wall_times(lambda: case.launch(cfg, out), plan.min_launches)
        else:
            samples = self._gpu_times(lambda: case.launch(cfg, out), plan)
        median, spread = summarise(samples)
        return Outcome(ok=True, median_ms=median, spread_ms=spread, samples=len(samples),
                       rel_error=case.gated[cfg], first_launch_ms=first_ms)

    def _sync(self) -> None:
        if not self.interpreter:
            import torch

            torch.cuda.synchronize()

    @staticmethod
    def _wall_times(fn: Callable[[], Any], n: int) -> list[float]:
        samples = []
        for _ in range(n):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return samples

    # -- GPU timing -------------------------------------------------------------------------------

    def _gpu_times(self, fn: Callable[[], Any], plan: LaunchPlan) -> list[float]:
        import torch

        graph = _capture(fn)
        run = graph.replay if graph is not None else fn
        cpu_ms = self._cpu_cost(run)
        estimate = statistics.median(self._event_times(run, 3, cpu_ms))
        samples = self._event_times(run, plan.launches(estimate), cpu_ms)
        del graph
        return samples

    @staticmethod
    def _cpu_cost(run: Callable[[], Any]) -> float:
        import torch

        torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        cost = (time.perf_counter() - start) * 1e3
        torch.cuda.synchronize()
        return cost

    def _event_times(self, run: Callable[[], Any], n: int, cpu_ms: float) -> list[float]:
        import torch

        if self._flush is None:  # allocated on first use: compile workers never time anything
            l2 = getattr(torch.cuda.get_device_properties(self.device), "L2_cache_size", 0) or (50 << 20)
            self._flush = torch.empty(2 * l2, dtype=torch.int8, device=self.device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        torch.cuda.synchronize()
        # Queue a sleep long enough for the CPU to enqueue every launch before the GPU reaches
        # them, so no event pair spans an idle gap of host-side launch work.
        self._sleep_ms(min(50.0, 0.2 + n * cpu_ms))
        for i in range(n):
            self._flush.zero_()
            starts[i].record()
            run()
            ends[i].record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]

    def _sleep_ms(self, ms: float) -> None:
        import torch

        if not hasattr(torch.cuda, "_sleep"):
            return
        if self._cycles_per_ms is None:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.cuda._sleep(1_000_000)
            end.record()
            torch.cuda.synchronize()
            self._cycles_per_ms = 1_000_000 / max(start.elapsed_time(end), 1e-3)
        torch.cuda._sleep(int(ms * self._cycles_per_ms))

    # -- precompile -------------------------------------------------------------------------------

    def precompile(self, request: Mapping[str, Any]) -> dict[str, Any]:
        problem = Problem.from_dict(request["problem"])
        cfg = KernelConfig.from_dict(request["config"])
        buckets = [int(t) for t in request["tokens"]]
        self._inject(cfg)
        start = time.perf_counter()
        try:
            for tokens in tiny_tokens(buckets, problem.topk):
                key = (problem, tokens)
                if self._compile_case is None or self._compile_key != key:
                    self._compile_case = None
                    self._compile_case = Case(problem, tokens, RoutingSpec(), 0, self.device,
                                              with_reference=False, weight_values=False)
                    self._compile_key = key
                with _kernels_compile_only():
                    self._compile_case.launch(cfg)
        except Exception as exc:
            return {"ok": False, "error": f"{type(exc).__name__}: {str(exc).strip()[:500]}",
                    "seconds": time.perf_counter() - start}
        return {"ok": True, "seconds": time.perf_counter() - start}


def _capture(fn: Callable[[], Any]):
    """A CUDA graph replaying ``fn``, or None when it cannot be captured (then launches are eager)."""
    import torch

    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graph.replay()
        torch.cuda.synchronize()
        return graph
    except Exception:
        torch.cuda.synchronize()
        return None


def _relative_error(out, ref) -> float:
    from moe_tune.reference import relative_error

    return relative_error(out, ref)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
