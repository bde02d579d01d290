"""Whole training steps — forward, backward, AdamW step — of the causal LM of ``moe_tune.bench.lm``,
per token count, training mode (full, expert weights frozen, LoRA on the experts) and experts
implementation (transformers' grouped_mm, moe-tune), eager and under ``torch.compile``.

Data flow: the master LM (built once) and one batch of token ids per token count (the same for
every run) → per (mode, eager/compiled, implementation) ``run_steps``: a deep copy of the master
set to the mode and implementation, its AdamW (``lm.make_optimizer``), ``torch.compile(model)``
when compiled; the first step's loss (before any update: every run's must agree); warm-up steps
(compiles and recompiles); then ``steps`` timed steps → ``StepRow``. A failure (a compile error, out of memory, PEFT refusing)
is a row with its error, and the device is cleared before the next run.

Timing is the host clock, not CUDA events (a step is many launches and an optimizer step; the
host side is half of what is measured): per step, ``time.perf_counter`` before the step, after its
last launch returned (``host``) and after synchronising the device (``step``); median over the
timed steps. Peak memory: the run's highest allocation during the timed steps above what was
allocated before its model copy (so weights, gradients, optimizer state and activations).
"""

from __future__ import annotations

import copy
import time
from typing import Callable

from moe_tune.bench.isolation import (describe_error, peak_memory_mib, peak_memory_reset, release, reset_compiler,
                                      synchronize)
from moe_tune.progress import NullProgress, Progress
from moe_tune.bench.results import STEP_IMPLEMENTATIONS, STEP_MODES, StepRow, Timing

# First-step losses of two runs on the same weights and data: bfloat16 rounding and compile's
# fusion order move the mean loss by ~1e-4 relative; NaN, inf and gross errors land far above.
LOSS_TOLERANCE = {"bfloat16": 5e-3, "float16": 2e-3, "float32": 1e-4}
# Steps before timing, eager and compiled: the first step compiles, the next may recompile (the
# optimizer's state exists from the second step on).
WARMUP_STEPS = {False: 2, True: 3}


def run_order(modes, compile_steps: bool) -> list[tuple[str, bool, str]]:
    """(mode, compiled, implementation) in table order."""
    return [(mode, compiled, impl) for mode in STEP_MODES if mode in modes
            for compiled in ((False, True) if compile_steps else (False,)) for impl in STEP_IMPLEMENTATIONS]


def _graph_count() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def run_steps(master, ids, *, tokens: int, mode: str, implementation: str, compiled: bool, device: str,
              steps: int, warmup: int | None = None, compile_backend: str = "inductor", seed: int = 0) -> StepRow:
    """Train a copy of ``master`` on ``ids`` for ``warmup`` (default ``WARMUP_STEPS``) plus
    ``steps`` steps; time the latter."""
    import torch

    from moe_tune.bench.lm import make_optimizer, prepare_mode

    base = peak_memory_reset(device)
    model = prepare_mode(copy.deepcopy(master), implementation, mode, seed)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], device)
    if compiled:
        reset_compiler()
        graphs_before = _graph_count()
        forward = torch.compile(model, backend=compile_backend)
    else:
        forward = model

    def step():
        loss = forward(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    first_loss = float(step().detach().float().item())
    for _ in range((WARMUP_STEPS[compiled] if warmup is None else warmup) - 1):
        step()
    synchronize(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()  # the window: timed steps only; the base stays before the copy
    host, wall = [], []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        launched = time.perf_counter()
        synchronize(device)
        done = time.perf_counter()
        host.append((launched - start) * 1e3)
        wall.append((done - start) * 1e3)
    peak = peak_memory_mib(device, base)
    graphs = _graph_count() - graphs_before if compiled else None
    return StepRow(tokens=tokens, mode=mode, implementation=implementation, compiled=compiled,
                   step=Timing.from_samples(wall), host=Timing.from_samples(host), peak_mib=peak, loss=first_loss,
                   graphs=graphs)


def bench_steps(master, config, tokens: int, *, modes, compile_steps: bool, dtype: str, device: str,
                seq_len: int, steps: int = 10, warmup: int | None = None, compile_backend: str = "inductor",
                progress: Progress | None = None, seed: int = 0,
                on_row: Callable[[StepRow], None] | None = None) -> list[StepRow]:
    """One ``StepRow`` per (mode, eager/compiled, implementation) at ``tokens`` tokens, each also
    passed to ``on_row`` as soon as it is measured."""
    from moe_tune.bench.lm import token_batch

    progress = progress or NullProgress()
    ids = token_batch(config, tokens, seq_len, device, seed)
    rows = []
    for mode, compiled, impl in run_order(modes, compile_steps):
        label = impl + ("+compile" if compiled else "")
        progress.begin(f"T={tokens} training step, {mode}: {label}" + (" (compiling)" if compiled else ""))
        try:
            rows.append(run_steps(master, ids, tokens=tokens, mode=mode, implementation=impl, compiled=compiled,
                                  device=device, steps=steps, warmup=warmup, compile_backend=compile_backend,
                                  seed=seed))
        except Exception as exc:  # one failed run is a row error; the others still run
            rows.append(StepRow(tokens=tokens, mode=mode, implementation=impl, compiled=compiled, step=None,
                                error=describe_error(exc)))
        finally:
            release(device)  # the copy, its optimizer state and its compiled graphs
        progress.end()
        if on_row is not None:
            on_row(rows[-1])
    return rows
