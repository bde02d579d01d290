"""``moe-tune bench``: a model's tuned kernels against the strongest baseline a user has —
cuBLAS grouped GEMM eager and under torch.compile, transformers' grouped_mm experts eager and
compiled — plus the heuristic default and a dense-matmul ceiling, the host overhead of the experts
block, and (``--step``) whole training steps of a small causal LM, on this GPU.

Data flow: flags → checks that need no GPU time (model, token counts, dtype, step modes, output
folders, matplotlib for ``--plot``, a CUDA GPU) → ``moe_tune.bench.run.run_bench`` with a rich
progress bar on stderr, the report so far written to ``--output``/``--markdown`` after each
section → ``BenchReport`` → tables on stdout (JSON with ``--json``), Markdown to ``--markdown``, a
PNG to ``--plot``. ``--from`` formats (and merges) saved reports instead of measuring. Exit 0; 1
when a moe-tune run disagreed with its baseline or failed (the report is still written; failed
baseline runs are rows with their error and a note on stderr); 2 for bad input, no GPU, or
``--plot`` without matplotlib.

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
# The interpreter runs each kernel program in Python (a tiny block's fwd+bwd takes ~1 s): the host
# section at 8 tokens, one call, one loop, and one warm-up and one timed training step keep
# `--interpret` to CI minutes.
INTERPRET_SIZES = dict(host_tokens=8, host_iterations=1, host_repeats=1, step_steps=1, step_warmup=1)

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
    if launch is not None and not launch.INTERPRETED:
        raise InvalidInputError("--interpret: the kernels were already loaded for a GPU in this process; "
                                "set TRITON_INTERPRET=1 before starting it")


def _step_modes(text: str) -> tuple[str, ...]:
    from moe_tune.bench.results import STEP_MODES

    modes = tuple(dict.fromkeys(m.strip() for m in text.replace(",", " ").split()))
    unknown = [m for m in modes if m not in STEP_MODES]
    if unknown or not modes:
        raise InvalidInputError(f"--step-modes takes {', '.join(STEP_MODES)} (comma-separated); "
                                f"cannot read {', '.join(unknown) or repr(text)}")
    return modes


def _load_reports(paths: list[Path]):
    from moe_tune.bench import report as fmt
    from moe_tune.bench.run_report import merge_reports

    reports = []
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise InvalidInputError(f"--from {path}: {exc.strerror or exc}") from None
        try:
            reports.append(fmt.from_json(text))
        except ValueError as exc:  # JSONDecodeError and InvalidInputError alike
            raise InvalidInputError(f"--from {path}: {exc}") from None
    return merge_reports(reports)


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
    gemms: Annotated[bool, typer.Option("--gemms/--no-gemms", help="Time the six grouped GEMMs.")] = True,
    block: Annotated[bool, typer.Option("--block/--no-block", help="Time the experts block against "
                                        "transformers (Qwen3-MoE family presets).")] = True,
    compile_: Annotated[bool, typer.Option(
        "--compile/--no-compile", help="Also run grouped_mm and moe-tune under torch.compile in every section "
        "(the baseline a user who compiles has; speed-ups are against the better grouped_mm).")] = True,
    host: Annotated[bool, typer.Option("--host/--no-host", help="Measure the experts block's host time and GPU "
                                       "launches per fwd+bwd at --host-tokens.")] = True,
    host_tokens: Annotated[Optional[int], typer.Option(
        "--host-tokens", help="Token count of the host-overhead section (default: 128; 8 with --interpret).",
        min=1, show_default=False)] = None,
    step: Annotated[bool, typer.Option("--step", help="Also time training steps (forward, backward, AdamW) of a "
                                       "small causal LM of the preset's family: full fine-tuning, experts frozen, "
                                       "LoRA on the experts (needs peft).")] = False,
    step_modes: Annotated[str, typer.Option("--step-modes", help="Training modes for --step: full, frozen, lora "
                                            "(comma-separated).")] = "full,frozen,lora",
    step_layers: Annotated[int, typer.Option("--step-layers", help="Decoder layers of the --step model.",
                                             min=1)] = 2,
    step_vocab: Annotated[int, typer.Option("--step-vocab", help="Vocabulary cap of the --step model (the "
                                            "family's default when smaller).", min=2)] = 16384,
    step_seq_len: Annotated[int, typer.Option("--step-seq-len", help="Sequence length of the --step model; "
                                              "T tokens are T / this sequences.", min=1)] = 2048,
    step_steps: Annotated[Optional[int], typer.Option(
        "--step-steps", help="Timed training steps per run, after warm-up (default: 10; 1 with --interpret).",
        min=1, show_default=False)] = None,
    cache_dir: BenchCacheDirOption = None,
    output_path: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="Write the report as JSON to this file, rewritten after each section (a run cut "
        "short keeps what it finished; read back with --from).", show_default=False)] = None,
    from_paths: Annotated[Optional[list[Path]], typer.Option(
        "--from", help="Format saved reports (from --output or --json) instead of measuring; several runs of "
        "one model on one card are merged (repeat --from).", metavar="FILE", show_default=False)] = None,
    markdown_path: Annotated[Optional[Path], typer.Option(
        "--markdown", help="Write the tables as Markdown to this file.", show_default=False)] = None,
    plot_path: Annotated[Optional[Path], typer.Option(
        "--plot", help="Write TFLOP/s against token count, one panel per problem, as PNG (needs matplotlib: "
        "pip install 'moe-tune[plot]').", show_default=False)] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random routing, inputs and weights.")] = 0,
    interpret: Annotated[bool, typer.Option(
        "--interpret", help="Run everything in Triton's CPU interpreter (tiny shapes; times are meaningless; "
        "torch.compile with the aot_eager backend).")] = False,
    json_output: JsonOption = False,
) -> None:
    """Time the tuned kernels against torch._grouped_mm (eager and compiled), the heuristic default and a dense
    ceiling; the experts block, its host overhead and (--step) training steps against transformers' grouped_mm."""
    from moe_tune.bench.env import require_cuda, require_matplotlib

    for path, flag in ((output_path, "--output"), (markdown_path, "--markdown"), (plot_path, "--plot")):
        _check_output(path, flag)
    if plot_path is not None:
        require_matplotlib()
    if from_paths:
        if model is not None or tokens is not None or more_tokens:
            raise InvalidInputError("--from formats saved reports: it takes no --model or --tokens")
        _finish(_load_reports(from_paths), output_path, markdown_path, plot_path, json_output)
        return

    from moe_tune.bench.lm import check_step_tokens
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
    modes = _step_modes(step_modes)
    if step:
        check_step_tokens(counts, step_seq_len)
    if interpret:
        _use_interpreter()
    else:
        require_cuda()

    from moe_tune import runtime
    from moe_tune.progress import RichProgress
    from moe_tune.bench.run import INTERPRETER_COMPILE_BACKEND, BenchOptions, run_bench
    from moe_tune.bench.timing import do_bench_timer, wall_timer

    if cache_dir is not None:
        runtime.set_cache_dir(cache_dir)
    small = INTERPRET_SIZES if interpret else {}
    options = BenchOptions(model=preset.name, shape=preset.shape, family=preset.family, tokens=counts, dtype=dtype,
                           device="cpu" if interpret else "cuda", seed=seed, gemms=gemms, block=block, host=host,
                           step=step, compile=compile_,
                           compile_backend=INTERPRETER_COMPILE_BACKEND if interpret else "inductor",
                           host_tokens=host_tokens or small.get("host_tokens", 128),
                           host_iterations=small.get("host_iterations", 50), host_repeats=small.get("host_repeats", 15),
                           step_modes=modes, step_layers=step_layers, step_vocab=step_vocab,
                           step_seq_len=step_seq_len, step_steps=step_steps or small.get("step_steps", 10),
                           step_warmup=small.get("step_warmup"))
    timer = wall_timer() if interpret else do_bench_timer(warmup, rep)

    def checkpoint(partial) -> None:
        _write_files(partial, output_path, markdown_path)

    with RichProgress() as progress:
        result = run_bench(options, timer, progress, checkpoint)
    _finish(result, output_path, markdown_path, plot_path, json_output)


def _write_files(result, output_path: Path | None, markdown_path: Path | None) -> None:
    from moe_tune.bench import report as fmt

    if output_path is not None:
        fmt.write_text(fmt.to_json(result), output_path)
    if markdown_path is not None:
        fmt.write_text(fmt.markdown(result), markdown_path)


def _finish(result, output_path: Path | None, markdown_path: Path | None, plot_path: Path | None,
            json_output: bool) -> None:
    """Write the files, print the report, and exit 1 when a moe-tune run disagreed or failed."""
    from moe_tune.bench import report as fmt
    from moe_tune.bench.results import is_baseline

    _write_files(result, output_path, markdown_path)
    if plot_path is not None:
        fmt.write_plot(result, plot_path)
    if json_output:
        typer.echo(fmt.to_json(result))
    else:
        fmt.print_report(result)
    baseline_errors = [f"{where} {impl}: {error}" for where, impl, error in result.row_errors if is_baseline(impl)]
    if baseline_errors:
        print(f"moe-tune: {len(baseline_errors)} baseline run(s) failed (reported as row errors): "
              f"{'; '.join(baseline_errors)}", file=sys.stderr)
    failed = result.failed_checks
    if failed:
        print(f"moe-tune: {len(failed)} moe-tune run(s) disagree with their baseline or failed (their times do not "
              f"compare): {'; '.join(failed)}", file=sys.stderr)
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
