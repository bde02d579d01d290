"""Whole training steps — forward, backward, AdamW step — of the causal LM of ``moe_tune.bench.lm``,
per token count, training mode (full, expert weights frozen, LoRA on the experts) and experts
implementation (transformers' grouped_mm, moe-tune; on CUDA also eager moe-tune with its CUDA
graphs around the experts block, ``GRAPHED``), eager and under ``torch.compile``.

Data flow: the master LM (built once) and one batch of token ids per token count (the same for
every run) → per (mode, eager/compiled) the implementations side by side (``bench_steps``): for
each, a deep copy of the master set to the mode and implementation, its AdamW
(``lm.make_optimizer``), ``torch.compile(model)`` when compiled; the first step's loss (before any
update: every run's must agree); warm-up steps (compiles and recompiles); one step for its peak
memory; then ``steps`` timed steps of each, alternating (A B, B A, A B, ...) so that a slow
phase of the host (these steps are mostly host time) weighs on all → one ``StepRow`` each. Where
the copies do not fit the device together, each runs alone, one after the other (the row says
so). A failure (a compile error, out of memory, PEFT refusing) is a row with its error, and the
device is cleared before the next (mode, eager/compiled).

Timing is the host clock, not CUDA events (a step is many launches and an optimizer step; the
host side is half of what is measured): per step, ``time.perf_counter`` before the step, after its
last launch returned (``host``) and after synchronising the device (``step``); median over the
timed steps. Peak memory: the highest allocation during one step in a window of its own, above
what was allocated before that step, plus what the model copy holds between steps (weights,
optimizer state): so weights, gradients, optimizer state and activations.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable

from moe_tune.bench.isolation import (allocated_bytes, describe_error, peak_memory_mib, peak_memory_reset, release,
                                      reset_compiler, synchronize)
from moe_tune.progress import NullProgress, Progress
from moe_tune.bench.results import GRAPHED, GRAPHED_MODES, STEP_IMPLEMENTATIONS, STEP_MODES, StepRow, Timing

# First-step losses of two runs on the same weights and data: bfloat16 rounding and compile's
# fusion order move the mean loss by ~1e-4 relative; NaN, inf and gross errors land far above.
LOSS_TOLERANCE = {"bfloat16": 5e-3, "float16": 2e-3, "float32": 1e-4}
# Steps before timing, eager and compiled: the first step compiles, the next may recompile (the
# optimizer's state exists from the second step on).
WARMUP_STEPS = {False: 2, True: 3}


def run_order(modes, compile_steps: bool, graphed: bool = False) -> list[tuple[str, bool, str]]:
    """(mode, compiled, implementation) in table order; with ``graphed``, eager moe-tune with its
    CUDA graphs (``GRAPHED``) as a third implementation of the eager ``GRAPHED_MODES``."""
    def impls(mode: str, compiled: bool) -> tuple[str, ...]:
        return STEP_IMPLEMENTATIONS + ((GRAPHED,) if graphed and not compiled and mode in GRAPHED_MODES else ())

    return [(mode, compiled, impl) for mode in STEP_MODES if mode in modes
            for compiled in ((False, True) if compile_steps else (False,)) for impl in impls(mode, compiled)]


def _graph_count() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# What a row says when its implementation's copy did not fit beside the other's
ALONE_NOTE = "timed alone: the model copies did not fit the device together"


@dataclass
class _Run:
    """One implementation's model copy, set up and warmed, and what its steps measured."""

    implementation: str
    step: Callable[[], object]
    loss: float
    static: int | None  # bytes the copy holds between steps (None off CUDA)
    graphs: int | None
    compiled: bool
    host: list = field(default_factory=list)
    wall: list = field(default_factory=list)
    peak_mib: float | None = None
    error: str | None = None
    out_of_memory: bool = False


def _start(master, ids, *, mode: str, implementation: str, compiled: bool, device: str, warmup: int | None,
           compile_backend: str, seed: int) -> _Run:
    """A copy of ``master`` for ``implementation`` in ``mode``, with its optimizer: its first
    step's loss, then the rest of its warm-up steps."""
    import torch

    from moe_tune.bench.lm import make_optimizer, prepare_mode
    from moe_tune.ops import graphs as cuda_graphs

    synchronize(device)
    before = allocated_bytes(device)
    graphed = implementation == GRAPHED  # moe-tune, its CUDA graphs on for its steps (off for the others')
    model = prepare_mode(copy.deepcopy(master), "moe_tune" if graphed else implementation, mode, seed)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], device)
    graphs_before = _graph_count() if compiled else None
    forward = torch.compile(model, backend=compile_backend) if compiled else model

    def step():
        with cuda_graphs.switched(graphed):
            loss = forward(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    first_loss = float(step().detach().float().item())
    for _ in range((WARMUP_STEPS[compiled] if warmup is None else warmup) - 1):
        step()
    synchronize(device)
    static = None if before is None else allocated_bytes(device) - before
    graphs = _graph_count() - graphs_before if compiled else None
    return _Run(implementation, step, first_loss, static, graphs, compiled)


def _measure_peak(run: _Run, device: str) -> None:
    """One step of ``run`` in a peak-memory window of its own (on CUDA)."""
    if device != "cuda":
        return
    base = peak_memory_reset(device)
    _step(run, device, timed=False)
    run.peak_mib = peak_memory_mib(device, base) + run.static / 2**20


def _step(run: _Run, device: str, timed: bool = True) -> None:
    """One step of ``run``, its host and wall times kept when ``timed``; any graph torch.compile
    makes during it added to the run's count."""
    before = _graph_count() if run.compiled else 0
    start = time.perf_counter()
    run.step()
    launched = time.perf_counter()
    synchronize(device)
    done = time.perf_counter()
    if timed:
        run.host.append((launched - start) * 1e3)
        run.wall.append((done - start) * 1e3)
    if run.compiled:
        run.graphs += _graph_count() - before


def _time(runs: list[_Run], device: str, steps: int) -> None:
    """Each run's peak step (round -1), then ``steps`` timed steps of each, alternating, the order
    reversed every round. A run that fails stops there with its error; the others go on."""
    for i in range(-1, steps):
        for run in (runs if i % 2 == 0 else runs[::-1]):
            if run.error is not None:
                continue
            try:
                if i < 0:
                    _measure_peak(run, device)
                else:
                    _step(run, device)
            except Exception as exc:
                run.error, run.out_of_memory = describe_error(exc), _is_out_of_memory(exc)


def _row(run: _Run, tokens: int, mode: str) -> StepRow:
    if run.error is not None:
        return StepRow(tokens=tokens, mode=mode, implementation=run.implementation, compiled=run.compiled, step=None,
                       error=run.error)
    return StepRow(tokens=tokens, mode=mode, implementation=run.implementation, compiled=run.compiled,
                   step=Timing.from_samples(run.wall), host=Timing.from_samples(run.host), peak_mib=run.peak_mib,
                   loss=run.loss, graphs=run.graphs)


def run_steps(master, ids, *, tokens: int, mode: str, implementation: str, compiled: bool, device: str,
              steps: int, warmup: int | None = None, compile_backend: str = "inductor", seed: int = 0) -> StepRow:
    """Train a copy of ``master`` on ``ids`` alone for ``warmup`` (default ``WARMUP_STEPS``) steps,
    one for its peak memory and ``steps`` timed ones."""
    if compiled:
        reset_compiler()
    run = _start(master, ids, mode=mode, implementation=implementation, compiled=compiled, device=device,
                 warmup=warmup, compile_backend=compile_backend, seed=seed)
    _time([run], device, steps)
    return _row(run, tokens, mode)


def _is_out_of_memory(exc: Exception) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError)


def bench_steps(master, config, tokens: int, *, modes, compile_steps: bool, dtype: str, device: str,
                seq_len: int, steps: int = 10, warmup: int | None = None, compile_backend: str = "inductor",
                progress: Progress | None = None, seed: int = 0, graphed: bool = False,
                on_row: Callable[[StepRow], None] | None = None) -> list[StepRow]:
    """One ``StepRow`` per (mode, eager/compiled, implementation) at ``tokens`` tokens, in
    ``run_order`` (``graphed``: with the CUDA-graphed moe-tune rows), each also passed to ``on_row``
    as soon as its (mode, eager/compiled) is measured."""
    from moe_tune.bench.lm import token_batch

    progress = progress or NullProgress()
    ids = token_batch(config, tokens, seq_len, device, seed)
    rows = []
    order = run_order(modes, compile_steps, graphed)
    for mode, compiled in dict.fromkeys((m, c) for m, c, _ in order):
        impls = [impl for m, c, impl in order if (m, c) == (mode, compiled)]
        pair_rows = _pair(master, ids, tokens, mode, compiled, impls, device, steps, warmup, compile_backend, seed,
                          progress)
        for row in pair_rows:
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows


def _pair(master, ids, tokens, mode, compiled, impls, device, steps, warmup, compile_backend, seed,
          progress) -> list[StepRow]:
    """The implementations of one (mode, eager/compiled), side by side; one after the other where a
    later copy does not fit beside the earlier ones."""
    runs: dict[str, _Run] = {}
    errors: dict[str, str] = {}
    alone = False
    try:
        if compiled:
            reset_compiler()  # once: both copies' compiled graphs stay usable side by side
        for impl in impls:
            label = impl + ("+compile" if compiled else "")
            progress.begin(f"T={tokens} training step, {mode}: {label}" + (" (compiling)" if compiled else ""))
            try:
                runs[impl] = _start(master, ids, mode=mode, implementation=impl, compiled=compiled, device=device,
                                    warmup=warmup, compile_backend=compile_backend, seed=seed)
            except Exception as exc:  # one failed run is a row error; the others still run
                if runs and _is_out_of_memory(exc):
                    alone = True
                    break
                errors[impl] = describe_error(exc)
            finally:
                progress.end()
        if not alone:
            _time(list(runs.values()), device, steps)
            alone = len(runs) > 1 and any(run.out_of_memory for run in runs.values())
        if alone:
            runs.clear()
            release(device)
            return [_alone(master, ids, tokens, mode, compiled, impl, device, steps, warmup, compile_backend, seed)
                    for impl in impls]
        return [_row(runs[impl], tokens, mode) if impl in runs else
                StepRow(tokens=tokens, mode=mode, implementation=impl, compiled=compiled, step=None,
                        error=errors[impl]) for impl in impls]
    finally:
        runs.clear()
        release(device)  # the copies, their optimizer state and their compiled graphs


def _alone(master, ids, tokens, mode, compiled, impl, device, steps, warmup, compile_backend, seed) -> StepRow:
    try:
        row = run_steps(master, ids, tokens=tokens, mode=mode, implementation=impl, compiled=compiled, device=device,
                        steps=steps, warmup=warmup, compile_backend=compile_backend, seed=seed)
        return dataclasses.replace(row, note=ALONE_NOTE) if row.error is None else row
    except Exception as exc:
        return StepRow(tokens=tokens, mode=mode, implementation=impl, compiled=compiled, step=None,
                       error=describe_error(exc))
    finally:
        release(device)
