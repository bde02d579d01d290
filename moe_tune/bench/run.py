"""One whole ``moe-tune bench`` run: options → ``BenchReport``.

Data flow: ``BenchOptions`` (model, shape, token counts, dtype, device, what to run) →
``run_bench``: the environment (``env.environment``), then per token count the six GEMM rows
(``gemms.bench_gemms``), then — unless skipped, with the reason kept — the experts block built
once and timed per token count (``block.bench_block``) → ``BenchReport``. The runtime loader's
cache-miss warnings are collected into one progress note (the report says per problem where each
tuned config came from); other warnings are passed on as notes, once each.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from moe_tune.bench.progress import NullProgress, Progress
from moe_tune.bench.results import BenchReport, BlockSection
from moe_tune.bench.timing import Timer
from moe_tune.errors import CacheWarning
from moe_tune.problem import MoeShape


@dataclass(frozen=True)
class BenchOptions:
    model: str  # a preset name, for the report and the sweep command it suggests
    shape: MoeShape
    family: str  # the preset's model family: decides whether the experts block can be built
    tokens: tuple[int, ...] = (4096, 16384)
    dtype: str = "bfloat16"
    device: str = "cuda"  # or "cpu": Triton's interpreter (TRITON_INTERPRET=1)
    seed: int = 0
    gemms: bool = True
    block: bool = True
    compile_block: bool = False  # also time moe-tune's block under torch.compile(fullgraph=True)


def planned_steps(options: BenchOptions, block_runs: bool) -> int:
    from moe_tune.bench.block import implementations
    from moe_tune.bench.gemms import STEPS_PER_CASE

    per_tokens = 6 * STEPS_PER_CASE if options.gemms else 0
    if block_runs:
        per_tokens += 2 * len(implementations(options.compile_block))
    return per_tokens * len(options.tokens)


def run_bench(options: BenchOptions, timer: Timer, progress: Progress | None = None) -> BenchReport:
    from moe_tune.bench.block import BLOCK_MODEL_FAMILY, bench_block, block_skip_reason, build_block
    from moe_tune.bench.env import environment
    from moe_tune.bench.gemms import bench_gemms

    progress = progress or NullProgress()
    env = environment(options.device)
    skipped = None if options.block else "not requested"
    if skipped is None:
        skipped = block_skip_reason(options.family, options.model)
    progress.start(planned_steps(options, skipped is None))

    gemm_rows, block_rows = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CacheWarning)
        if options.gemms:
            for tokens in options.tokens:
                gemm_rows += bench_gemms(options.shape, tokens, dtype=options.dtype, device=options.device,
                                         timer=timer, progress=progress, seed=options.seed)
                _free(options.device)
        if skipped is None:
            block = build_block(options.shape, options.dtype, options.device, options.seed)
            for tokens in options.tokens:
                block_rows += bench_block(block, options.shape, tokens, dtype=options.dtype, device=options.device,
                                          timer=timer, progress=progress, compile_moe_tune=options.compile_block,
                                          seed=options.seed)
            del block
            _free(options.device)
    _pass_on(caught, options, progress)

    settings = {**timer.describe(), "seed": options.seed, "routing": "random router logits -> top-k"}
    return BenchReport(environment=env, model=options.model, shape=options.shape, dtype=options.dtype,
                       tokens=tuple(options.tokens), settings=settings, gemms=tuple(gemm_rows),
                       block=BlockSection(rows=tuple(block_rows), skipped=skipped,
                                          family=BLOCK_MODEL_FAMILY if skipped is None else None))


def _free(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


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
