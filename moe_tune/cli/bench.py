"""``moe-tune bench``: a model's tuned kernels against cuBLAS grouped GEMM, the heuristic default
and a dense-matmul ceiling, plus the experts block against transformers, on this GPU.

Data flow: flags → checks that need no GPU time (model, token counts, dtype, output folders,
matplotlib for ``--plot``, a CUDA GPU) → ``moe_tune.bench.run.run_bench`` with a rich progress bar
on stderr → ``BenchReport`` → tables on stdout (JSON with ``--json``), Markdown to ``--markdown``,
a PNG to ``--plot``. Exit 0; 1 when a moe-tune run's output disagreed with its baseline (the report
is still written); 2 for bad input, no GPU, or ``--plot`` without matplotlib.

torch, triton, transformers and matplotlib load inside the command, never at import.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from moe_tune.cli.options import JsonOption
from moe_tune.errors import InvalidInputError

DEFAULT_TOKENS = (4096, 16384)
INTERPRET_TOKENS = (16,)

BenchCacheDirOption = Annotated[
    Optional[Path],
    typer.Option("--cache-dir", help="A cache directory (or file) searched first for tuned configs, before "
                 "$MOE_TUNE_CACHE_DIR, the user cache and the shipped caches.", show_default=False),
]


def _token_counts(texts: list[str]) -> tuple[int, ...]:
    values = []
    for text in texts:
        for part in text.replace(",", " ").split():
            scale = 1
            if part[-1:].lower() == "k":
                part, scale = part[:-1], 1024
            try:
                value = int(part) * scale
            except ValueError:
                raise InvalidInputError(f"--tokens takes integers like 4096 16384 (or 4k,16k); cannot read {part!r}") \
                    from None
            if value <= 0:
                raise InvalidInputError(f"--tokens must be positive, got {value}")
            values.append(value)
    return tuple(dict.fromkeys(values))  # keep order, drop repeats


def _check_output(path: Path | None, flag: str) -> None:
    if path is None:
        return
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InvalidInputError(f"{flag} {path}: folder {parent} does not exist")
    if path.is_dir():
        raise InvalidInputError(f"{flag} {path} is a folder; give a file name")


def _use_interpreter() -> None:
    """Kernels decorated before TRITON_INTERPRET was set would try to compile for a GPU."""
    launch = sys.modules.get("moe_tune.ops.launch")
    os.environ["TRITON_INTERPRET"] = "1"
    if launch is not None and not launch.OPAQUE_OPS:
        raise InvalidInputError("--interpret: the kernels were already loaded for a GPU in this process; "
                                "set TRITON_INTERPRET=1 before starting it")


def bench(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="A model preset (see `moe-tune models`) "
                                                 "(default: tiny with --interpret).", show_default=False)] = None,
    tokens: Annotated[Optional[str], typer.Option(
        "--tokens", help="Token counts per micro-batch: --tokens 4096 16384 or --tokens 4096,16384 "
        "(default: 4096 16384; 16 with --interpret).", show_default=False)] = None,
    more_tokens: Annotated[Optional[list[str]], typer.Argument(
        hidden=True, help="More token counts (what follows --tokens 4096 ...).", show_default=False)] = None,
    dtype: Annotated[Optional[str], typer.Option(
        "--dtype", help="bfloat16, float16 or float32 (default: bfloat16; float32 with --interpret).",
        show_default=False)] = None,
    warmup: Annotated[float, typer.Option("--warmup", help="do_bench warm-up per measurement, ms.", min=1)] = 25,
    rep: Annotated[float, typer.Option("--rep", help="do_bench repetition time per measurement, ms.", min=1)] = 100,
    block: Annotated[bool, typer.Option("--block/--no-block", help="Also time the experts block against "
                                        "transformers (Qwen3-MoE family presets).")] = True,
    compile_block: Annotated[bool, typer.Option(
        "--compile", help="Also time moe-tune's experts block under torch.compile(fullgraph=True).")] = False,
    cache_dir: BenchCacheDirOption = None,
    markdown_path: Annotated[Optional[Path], typer.Option(
        "--markdown", help="Write the tables as Markdown to this file.", show_default=False)] = None,
    plot_path: Annotated[Optional[Path], typer.Option(
        "--plot", help="Write TFLOP/s against token count, one panel per problem, as PNG (needs matplotlib: "
        "pip install 'moe-tune\\[plot]').", show_default=False)] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random routing, inputs and weights.")] = 0,
    interpret: Annotated[bool, typer.Option(
        "--interpret", help="Run everything in Triton's CPU interpreter (tiny shapes; times are meaningless).")
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Time the tuned kernels against torch._grouped_mm, the heuristic default and a dense ceiling."""
    from moe_tune.bench.env import require_cuda, require_matplotlib
    from moe_tune.models import find_preset

    if model is None:
        if not interpret:
            raise InvalidInputError("--model is required (see `moe-tune models`)")
        model = "tiny"
    preset = find_preset(model)
    texts = ([tokens] if tokens else []) + list(more_tokens or [])
    counts = _token_counts(texts) if texts else (INTERPRET_TOKENS if interpret else DEFAULT_TOKENS)
    dtype = dtype or ("float32" if interpret else "bfloat16")
    if interpret and dtype != "float32":
        raise InvalidInputError("--interpret runs float32 only (Triton's interpreter computes bfloat16 wrongly)")
    if not interpret and dtype not in ("bfloat16", "float16", "float32"):
        raise InvalidInputError(f"--dtype must be bfloat16, float16 or float32, got {dtype!r}")
    _check_output(markdown_path, "--markdown")
    _check_output(plot_path, "--plot")
    if plot_path is not None:
        require_matplotlib()
    if interpret:
        _use_interpreter()
    else:
        require_cuda()

    from moe_tune import runtime
    from moe_tune.bench import report as fmt
    from moe_tune.bench.progress import RichProgress
    from moe_tune.bench.run import BenchOptions, run_bench
    from moe_tune.bench.timing import do_bench_timer, wall_timer

    if cache_dir is not None:
        runtime.set_cache_dir(cache_dir)
    options = BenchOptions(model=preset.name, shape=preset.shape, family=preset.family, tokens=counts, dtype=dtype,
                           device="cpu" if interpret else "cuda", seed=seed, block=block,
                           compile_block=compile_block)
    timer = wall_timer() if interpret else do_bench_timer(warmup, rep)
    with RichProgress() as progress:
        result = run_bench(options, timer, progress)

    if markdown_path is not None:
        fmt.write_text(fmt.markdown(result), markdown_path)
    if plot_path is not None:
        fmt.write_plot(result, plot_path)
    if json_output:
        typer.echo(fmt.to_json(result))
    else:
        fmt.print_report(result)
    failed = result.failed_checks
    if failed:
        print(f"moe-tune: {len(failed)} run(s) disagree with their baseline beyond the tolerance (their times do not "
              f"compare): {'; '.join(failed)}", file=sys.stderr)
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
