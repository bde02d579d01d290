"""One whole ``moe-tune bench`` run: options → ``BenchReport``.

Data flow: ``BenchOptions`` (model, shape, token counts, dtype, device, which sections, compile)
→ ``run_bench``: the environment (``env.environment``), then per token count the six GEMM rows
(``gemms.bench_gemms``), then — unless skipped, with the reason kept — the experts block built once
and timed per token count (``block.bench_block``) and at a small token count for its host overhead
(``host.bench_host``), then the causal LM built once and trained per token count
(``lm``, ``step.bench_steps``) → ``BenchReport``. ``checkpoint`` (if given) receives the report so
far after each token count of a section and after each training-step run, so a run cut short (a
time limit) keeps what it finished. The runtime loader's
cache-miss warnings are collected into one progress note (the report says per problem where each
tuned config came from); other warnings are passed on as notes, once each.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Callable

from moe_tune.bench.isolation import describe_error, release
from moe_tune.progress import NullProgress, Progress
from moe_tune.bench.results import NOT_REQUESTED, STEP_MODES, BlockSection, HostSection, StepSection
from moe_tune.bench.run_report import BenchReport
from moe_tune.bench.timing import Timer
from moe_tune.errors import CacheWarning
from moe_tune.problem import MoeShape

# Inductor's CPU code generation compiles C++ (about a minute per graph on a CI runner's two cores),
# and it is not what the interpreter run checks: Dynamo's trace, AOTAutograd and moe-tune's ops
# under them are, which the ``aot_eager`` backend runs without code generation.
INTERPRETER_COMPILE_BACKEND = "aot_eager"

# What a section says in a checkpoint written before it ran (the final report replaces it).
UNFINISHED = "did not finish: the run stopped before this section"


@dataclass(frozen=True)
class BenchOptions:
    model: str  # a preset name, for the report and the sweep command it suggests
    shape: MoeShape
    family: str  # the preset's model family: decides whether the block and the LM can be built
    tokens: tuple[int, ...] = (4096, 16384)
    dtype: str = "bfloat16"
    device: str = "cuda"  # or "cpu": Triton's interpreter (TRITON_INTERPRET=1)
    seed: int = 0
    gemms: bool = True
    block: bool = True
    host: bool = True
    step: bool = False
    compile: bool = True  # also run grouped_mm and moe-tune under torch.compile, in every section
    compile_backend: str = "inductor"
    host_tokens: int = 128
    host_iterations: int = 50
    host_repeats: int = 15
    step_modes: tuple[str, ...] = STEP_MODES
    step_layers: int = 2
    step_vocab: int = 16384
    step_seq_len: int = 2048
    step_steps: int = 10
    step_warmup: int | None = None  # None: step.WARMUP_STEPS (2 eager, 3 compiled)


def gemm_compile_skip(dtype: str) -> str | None:
    """Why the compiled ``torch._grouped_mm`` GEMM column cannot run in ``dtype`` (None: it can)."""
    if dtype != "bfloat16":
        # torch's meta function for _grouped_mm, which torch.compile traces through, refuses other dtypes.
        return f"skipped: torch._grouped_mm compiles for bfloat16 only, not {dtype}"
    return None


def planned_steps(options: BenchOptions, block_runs: bool, host_runs: bool = False,
                  step_modes: tuple[str, ...] = ()) -> int:
    from moe_tune.bench.block import implementations
    from moe_tune.bench.gemms import steps_per_case
    from moe_tune.bench.lm import graphed_rows
    from moe_tune.bench.step import run_order

    gemm_compiled = options.compile and gemm_compile_skip(options.dtype) is None
    per_tokens = 6 * steps_per_case(gemm_compiled) if options.gemms else 0
    if block_runs:
        per_tokens += 2 * len(implementations(options.compile))
    per_tokens += len(run_order(step_modes, options.compile, graphed_rows(options.family, options.device)))
    total = per_tokens * len(options.tokens)
    if host_runs:
        total += len(implementations(options.compile)) + (options.device == "cuda")  # + the graphed row
    return total


def _skip_reasons(options: BenchOptions) -> tuple[str | None, str | None, str | None, dict[str, str]]:
    """Why the block, host and step sections do not run (None: they do), and skipped step modes."""
    from moe_tune.bench.block import block_skip_reason
    from moe_tune.bench.lm import lora_skip_reason, step_skip_reason

    block_reason = block_skip_reason(options.shape, options.model) if options.block or options.host else None
    block = (block_reason or None) if options.block else NOT_REQUESTED
    host = (block_reason or None) if options.host else NOT_REQUESTED
    step = step_skip_reason(options.family, options.model) if options.step else NOT_REQUESTED
    mode_skipped = {}
    if step is None and "lora" in options.step_modes:
        lora = lora_skip_reason()
        if lora:
            mode_skipped["lora"] = lora
    return block, host, step, mode_skipped


def run_bench(options: BenchOptions, timer: Timer, progress: Progress | None = None,
              checkpoint: Callable[[BenchReport], None] | None = None) -> BenchReport:
    from moe_tune.bench.env import environment

    progress = progress or NullProgress()
    block_skip, host_skip, step_skip, mode_skipped = _skip_reasons(options)
    modes = tuple(m for m in STEP_MODES if m in options.step_modes and m not in mode_skipped)
    progress.start(planned_steps(options, block_skip is None, host_skip is None, modes if step_skip is None else ()))
    settings = {**timer.describe(), "seed": options.seed, "routing": "random router logits -> top-k",
                "compile": ({"backend": options.compile_backend, "block": "torch.compile(experts, fullgraph=True)",
                             "gemm": gemm_compile_skip(options.dtype) or "torch.compile(fn, fullgraph=True)",
                             "step": "torch.compile(model)"} if options.compile else None)}
    report = BenchReport(environment=environment(options.device), model=options.model, shape=options.shape,
                         dtype=options.dtype, tokens=tuple(options.tokens), settings=settings, gemms=(),
                         block=BlockSection(skipped=block_skip or UNFINISHED),
                         host=HostSection(skipped=host_skip or UNFINISHED),
                         step=StepSection(skipped=step_skip or UNFINISHED, mode_skipped=mode_skipped))

    def save(updated: BenchReport) -> BenchReport:
        if checkpoint is not None:
            checkpoint(updated)
        return updated

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CacheWarning)
        if options.gemms:
            report = _gemms(options, timer, progress, report, save)
        if block_skip is None or host_skip is None:
            try:
                report = _block_and_host(options, timer, progress, report, block_skip is None, host_skip is None,
                                         save)
            except Exception as exc:  # building the block failed (out of memory): the other sections still run
                why = f"the experts block could not be built ({describe_error(exc)})"
                report = dataclasses.replace(report, block=BlockSection(skipped=block_skip or why),
                                             host=HostSection(skipped=host_skip or why))
                release(options.device)
            report = save(report)
        if step_skip is None:
            try:
                report = _steps(options, progress, report, modes, mode_skipped, save)
            except Exception as exc:  # building the LM failed; rows fail one by one inside
                report = dataclasses.replace(report, step=StepSection(
                    skipped=f"the causal LM could not be built ({describe_error(exc)})"))
                release(options.device)
            save(report)
    progress.finish()  # a section that could not be built leaves steps planned that never ran
    _pass_on(caught, options, progress)
    return report


Save = Callable[[BenchReport], BenchReport]


def _gemms(options: BenchOptions, timer: Timer, progress: Progress, report: BenchReport, save: Save) -> BenchReport:
    from moe_tune.bench.gemms import bench_gemms

    compiled = options.compile and gemm_compile_skip(options.dtype) is None
    rows = []
    for tokens in options.tokens:
        rows += bench_gemms(options.shape, tokens, dtype=options.dtype, device=options.device, timer=timer,
                            progress=progress, seed=options.seed,
                            compile_backend=options.compile_backend if compiled else None)
        release(options.device)
        report = save(dataclasses.replace(report, gemms=tuple(rows)))
    return report


def _block_and_host(options: BenchOptions, timer: Timer, progress: Progress, report: BenchReport, block: bool,
                    host: bool, save: Save) -> BenchReport:
    from moe_tune.bench.block import BLOCK_MODEL_FAMILY, bench_block, build_block
    from moe_tune.bench.host import bench_host

    experts_block = build_block(options.shape, options.dtype, options.device, options.seed)
    if block:
        rows = []
        for tokens in options.tokens:
            rows += bench_block(experts_block, options.shape, tokens, dtype=options.dtype, device=options.device,
                                timer=timer, progress=progress, compile_block=options.compile,
                                compile_backend=options.compile_backend, seed=options.seed)
            report = save(dataclasses.replace(report, block=BlockSection(rows=tuple(rows),
                                                                         family=BLOCK_MODEL_FAMILY)))
    if host:
        rows = bench_host(experts_block, options.shape, tokens=options.host_tokens, dtype=options.dtype,
                          device=options.device, iterations=options.host_iterations, repeats=options.host_repeats,
                          progress=progress, compile_block=options.compile, compile_backend=options.compile_backend,
                          seed=options.seed)
        report = dataclasses.replace(report, host=HostSection(tokens=options.host_tokens,
                                                              iterations=options.host_iterations,
                                                              repeats=options.host_repeats, rows=tuple(rows)))
    del experts_block
    release(options.device)
    return report


def _steps(options: BenchOptions, progress: Progress, report: BenchReport, modes: tuple[str, ...],
           mode_skipped: dict[str, str], save: Save) -> BenchReport:
    from moe_tune.bench.lm import build_lm, describe, graphed_rows, lm_config
    from moe_tune.bench.step import LOSS_TOLERANCE, bench_steps

    config = lm_config(options.shape, options.family, options.step_layers, options.step_vocab, options.step_seq_len)
    master = build_lm(config, options.dtype, options.device, options.seed)
    section = StepSection(model=describe(config, options.family, options.shape, options.step_seq_len),
                          mode_skipped=mode_skipped, loss_tolerance=LOSS_TOLERANCE[options.dtype])
    rows: list = []

    def row_done(row) -> None:
        rows.append(row)
        save(dataclasses.replace(report, step=dataclasses.replace(section, rows=tuple(rows))))

    for tokens in options.tokens:
        bench_steps(master, config, tokens, modes=modes, compile_steps=options.compile, dtype=options.dtype,
                    device=options.device, seq_len=options.step_seq_len, steps=options.step_steps,
                    warmup=options.step_warmup, compile_backend=options.compile_backend, progress=progress,
                    seed=options.seed, graphed=graphed_rows(options.family, options.device), on_row=row_done)
    del master
    release(options.device)
    return dataclasses.replace(report, step=dataclasses.replace(section, rows=tuple(rows)))


def _pass_on(caught, options: BenchOptions, progress: Progress) -> None:
    misses, seen = 0, set()
    for w in caught:
        message = str(w.message)
        if issubclass(w.category, CacheWarning) and "no tuned config for" in message:
            misses += 1
            continue
        text = f"{w.category.__name__}: {message}"
        if text not in seen:
            seen.add(text)
            progress.note(text)
    if misses:
        progress.note(f"no cache holds a tuned config for {misses} problem(s) on this device: their 'tuned' column "
                      f"is the heuristic default (fill the cache with: moe-tune sweep --model {options.model} "
                      f"--dtype {options.dtype})")
