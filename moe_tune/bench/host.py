"""Host overhead of the experts block: what one forward+backward costs the CPU, and how many GPU
launches it makes, at a token count small enough that the GPU waits on the host.

At a few thousand tokens per micro-batch a training step can be bound by the host's launch rate
rather than the GPU: then a faster kernel does not shorten the step, fewer launches and less
Python per call do. This section measures that side directly.

Data flow: the block and routing of ``moe_tune.bench.block`` (``block_inputs``, ``prepare``: same
weights and routing, compiled when the label says so) at ``tokens`` tokens (default 128) →
per implementation:

* host time — ``time.perf_counter`` from the first call of a loop of fwd+bwd calls that never
  synchronise to the return of its last launch, divided by the calls: one sample per repeat. CUDA
  launches are asynchronous, so the host waits on the GPU only when CUDA's launch queue is full
  (~1000 pending launches); each loop is kept to ``QUEUED_LAUNCHES`` launches, below that, so
  the figure is the host's work alone even where the GPU is the slower side. (Holding the GPU
  back with a spin kernel instead was tried: it made launches slower and read above the wall
  time, H200);
* wall time — ``iterations`` calls, until the device finished them, per call: the block's real
  rate at this size, host- or GPU-bound, whichever is slower;
* launches — one fwd+bwd under ``torch.profiler`` with CUDA activity: GPU kernels, and
  memcpy/memset operations, counted from its CUDA events (CUDA only);

On CUDA one more row, ``GRAPHED``: moe-tune eager with its opt-in CUDA graphs
(``moe_tune.ops.graphs``, what ``MOE_TUNE_CUDA_GRAPHS=1`` turns on), captured on the second call.

→ ``HostRow``; a failure is a row with its error. No CUDA events are created here: the host clock
is the quantity measured.
"""

from __future__ import annotations

import contextlib
import time

from moe_tune.bench.block import block_inputs, implementations, prepare
from moe_tune.bench.isolation import describe_error, release, synchronize
from moe_tune.progress import NullProgress, Progress
from moe_tune.bench.results import COMPILED, GRAPHED, HostRow, Timing
from moe_tune.problem import MoeShape

HOST_TOKENS = 128  # the figure: the token count where a training step is bound by launches

# Launches one host-time loop may queue: under the ~1000 after which a CUDA launch blocks until
# the GPU drains some (a 50-call loop queued 3700 of grouped_mm's, and timed the GPU). Not
# understood yet: grouped_mm's short loops (6-10 calls) still read ~1.6x its 50-call wall time
# per call (H100), where moe-tune's 50-call loops read at or below theirs; read the host column
# beside the wall column, and compare runs of one machine only.
QUEUED_LAUNCHES = 768


def count_launches(fn, device: str) -> tuple[int | None, int | None]:
    """(GPU kernels, memcpy/memset operations) one call of ``fn`` issues; (None, None) off CUDA."""
    if device != "cuda":
        return None, None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        synchronize(device)
    kernels = memops = 0
    for event in prof.events():
        if event.device_type != DeviceType.CUDA or getattr(event, "is_user_annotation", False):
            continue
        kind = getattr(event, "activity_type", None)
        if kind is None:  # a torch whose events do not carry the CUPTI activity: go by name
            kind = "gpu_memcpy" if event.name.startswith(("Memcpy", "Memset")) else "kernel"
        if kind == "kernel":
            kernels += 1
        elif kind in ("gpu_memcpy", "gpu_memset"):
            memops += 1
    return kernels, memops


def _loop_ms(call, iterations: int, device: str) -> tuple[float, float]:
    """(host, wall) ms per call of ``iterations`` calls: the host's up to the return of the last
    launch, the wall's until the device finished them (the next loop starts on an empty queue)."""
    start = time.perf_counter()
    for _ in range(iterations):
        call()
    launched = time.perf_counter()
    synchronize(device)
    done = time.perf_counter()
    return (launched - start) * 1e3 / iterations, (done - start) * 1e3 / iterations


def bench_host(block, shape: MoeShape, *, tokens: int = HOST_TOKENS, dtype: str, device: str,
               iterations: int = 50, repeats: int = 15, progress: Progress | None = None,
               compile_block: bool = False, compile_backend: str = "inductor", seed: int = 0) -> list[HostRow]:
    """One ``HostRow`` per implementation (``block.implementations`` order)."""
    progress = progress or NullProgress()
    inputs = block_inputs(block, shape, tokens, dtype, device, seed)
    rows = []
    for label in implementations(compile_block) + ((GRAPHED,) if device == "cuda" else ()):
        progress.begin(f"T={tokens} host overhead: {label}")
        try:
            with _cuda_graphs(label == GRAPHED):
                rows.append(_measure(block, label, inputs, device, iterations, repeats, compile_backend))
        finally:
            inputs.clear()
            if COMPILED in label:
                release(device)
        progress.end()
    return rows


@contextlib.contextmanager
def _cuda_graphs(on: bool):
    """moe-tune's CUDA graphs on (or off) within, as before outside; the graphs dropped after."""
    from moe_tune.ops import graphs

    try:
        with graphs.switched(on):
            yield
    finally:
        graphs.reset()


def _measure(block, label: str, inputs, device: str, iterations: int, repeats: int, compile_backend: str) -> HostRow:
    prepared = None
    try:
        prepared = prepare(block, label, inputs, compile_backend)
        prepared.results = {}

        def call():
            inputs.clear()  # a few attribute writes: part of what a training loop does per step
            prepared.fwd_bwd()

        call()  # the second call: allocator warm, nothing compiled (graphed: the capture)
        synchronize(device)
        wall = [_loop_ms(call, iterations, device)[1] for _ in range(repeats)]
        kernels, memops = count_launches(call, device)
        calls = max(1, min(iterations, QUEUED_LAUNCHES // max(1, (kernels or 0) + (memops or 0))))
        host = [_loop_ms(call, calls, device)[0] for _ in range(repeats)]
        return HostRow(implementation=label, host=Timing.from_samples(host), wall=Timing.from_samples(wall),
                       kernels=kernels, memops=memops, note=prepared.note)
    except Exception as exc:  # one failed implementation is a row error; the others still run
        return HostRow(implementation=label, host=None, wall=None, error=describe_error(exc),
                       note=prepared.note if prepared else None)
