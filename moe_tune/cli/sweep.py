"""``moe-tune sweep``: tune a model's six problems (and, with ``--lora-rank``, its LoRA block's GEMMs)
on this host's GPUs and write them to the cache.

Data flow: flags → ``tuning.options.SweepOptions`` → ``tuning.sweep.run_sweep`` (progress bars
with ETA per problem on stderr: ``moe_tune.progress.RichProgress``) → a summary table (problem ×
bucket: best config, TFLOP/s, speedup over the heuristic default, which stays where no config beat
it beyond the noise) on stdout, or the whole report as JSON with ``--json``. Exit 0 when every
bucket has a tuned config; 1 when the budget stopped the sweep, a torchrun rank did not report or
a bucket found no config that passed the correctness gate; 2 for bad input or no GPU. Under
torchrun only rank 0 prints the report (every rank's results); the other ranks print one line on
stderr. ``docs/multi-gpu.md`` describes ``--gpus``, torchrun and ``--shard``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from moe_tune.cli.models import EpOption, HfConfigOption, ShapeOption, TpOption
from moe_tune.cli.options import JsonOption
from moe_tune.errors import InvalidInputError

# The shared --cache-dir, plus the -o short form `sweep` has always documented (it is the
# command's output directory).
SweepCacheDirOption = Annotated[
    Optional[Path],
    typer.Option("--cache-dir", "-o", help="Cache directory to write (default: $MOE_TUNE_CACHE_DIR, else the user "
                 "cache dir); the journal goes to its journals/ folder.", show_default=False),
]


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    values = []
    for part in text.replace(",", " ").split():
        scale = 1
        if part[-1:].lower() == "k":
            part, scale = part[:-1], 1024
        try:
            values.append(int(part) * scale)
        except ValueError:
            raise InvalidInputError(f"{flag} takes integers like 1024,4096 (or 1k,4k); cannot read {part!r}") from None
    if not values:
        raise InvalidInputError(f"{flag} needs at least one value")
    return tuple(values)


def _names(text: str) -> tuple[str, ...]:
    return tuple(p for p in text.replace(",", " ").split() if p)


def sweep(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="A model preset (see `moe-tune models`).",
                                                 show_default=False)] = None,
    hf_config: HfConfigOption = None,
    shape: ShapeOption = None,
    ep: EpOption = 1,
    tp: TpOption = 1,
    tokens: Annotated[Optional[str], typer.Option(
        "--tokens", help="Token buckets (tokens per micro-batch), e.g. 1024,4096,16384 "
        "[default: 1024..32768 by powers of two; 32,64 with --interpret].", show_default=False)] = None,
    passes: Annotated[str, typer.Option("--passes", help="Passes to tune: forward,dx,dw.")] = "forward,dx,dw",
    gemms: Annotated[str, typer.Option("--gemms", help="GEMMs to tune: up (gate_up), down.")] = "up,down",
    lora_rank: Annotated[Optional[str], typer.Option(
        "--lora-rank", help="Also tune the LoRA block's GEMMs at these ranks, e.g. 16,64 (the factors' GEMMs of "
        "`moe_experts(..., lora=...)` and the PEFT drop-in).", show_default=False)] = None,
    lora_only: Annotated[bool, typer.Option(
        "--lora-only", help="With --lora-rank: tune only the LoRA GEMMs and leave the base six as cached.")] = False,
    dtype: Annotated[Optional[str], typer.Option(
        "--dtype", help="bfloat16, float16 or float32 [default: bfloat16; float32 with --interpret].",
        show_default=False)] = None,
    routing: Annotated[str, typer.Option(
        "--routing", help="Token routing while tuning: uniform, zipf:S (skewed) or trace:FILE (.pt/.npy of int [T,k]).")
    ] = "uniform",
    space: Annotated[Optional[str], typer.Option(
        "--space", help="Config space: quick, default or full [default: default; interpret with --interpret].",
        show_default=False)] = None,
    budget: Annotated[Optional[float], typer.Option(
        "--budget", help="Wall-clock cap in seconds; finished buckets are written, --resume continues.",
        show_default=False)] = None,
    cache_dir: SweepCacheDirOption = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the journal of an interrupted sweep.")] = False,
    exhaustive: Annotated[bool, typer.Option(
        "--exhaustive", help="Compile, screen and re-time every legal config (to check the fast search).")] = False,
    interpret: Annotated[bool, typer.Option(
        "--interpret", help="Run the whole pipeline in Triton's CPU interpreter (tiny shapes; times are meaningless).")
    ] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random routing and inputs.")] = 0,
    candidate_timeout: Annotated[float, typer.Option(
        "--candidate-timeout", help="Seconds a candidate may take before its worker is killed.")] = 120.0,
    compile_workers: Annotated[Optional[int], typer.Option(
        "--compile-workers", help="Processes compiling candidates ahead of timing [default: the CPU cores less "
        "one per GPU and one, at most 32].", show_default=False)] = None,
    gpus: Annotated[Optional[str], typer.Option(
        "--gpus", help="GPUs to time on, e.g. 0,2 or 1 [default: every visible GPU; under torchrun each rank's "
        "LOCAL_RANK GPU]. With --interpret: how many CPU lanes, e.g. 0,1.", show_default=False)] = None,
    shard: Annotated[Optional[str], typer.Option(
        "--shard", help="i/n: run this job's deterministic 1/n of the problems (scheduler arrays); merge the "
        "shards' caches with `moe-tune merge`.", show_default=False)] = None,
    gather_timeout: Annotated[Optional[float], typer.Option(
        "--gather-timeout", help="torchrun: seconds a rank waits for the others where they meet (after the "
        "screens, at the end) before it reports them missing [default: 6 hours].", show_default=False)] = None,
    json_output: JsonOption = False,
) -> None:
    """Tune the grouped-GEMM kernels of a model's MoE layer on this host's GPUs and write the cache."""
    from moe_tune.models import resolve_model
    from moe_tune.progress import RichProgress
    from moe_tune.tuning.distribute import parse_gpus, parse_shard
    from moe_tune.tuning.options import SweepOptions
    from moe_tune.tuning.routing_spec import RoutingSpec
    from moe_tune.tuning.sweep import run_sweep

    if interpret and not (model or hf_config or shape):
        model = "tiny"
    spec = resolve_model(model=model, hf_config=hf_config, shape=shape, ep=ep, tp=tp)
    options = SweepOptions(
        model=spec,
        tokens=_int_list(tokens, "--tokens") if tokens else None,
        passes=_names(passes),
        gemms=_names(gemms),
        dtype=dtype,
        routing=RoutingSpec.parse(routing),
        space=space,
        exhaustive=exhaustive,
        budget_s=budget,
        cache_dir=cache_dir,
        resume=resume,
        interpret=interpret,
        seed=seed,
        candidate_timeout_s=candidate_timeout,
        compile_workers=compile_workers,
        gpus=parse_gpus(gpus, _lanes_available(interpret)) if gpus is not None else None,
        shard=parse_shard(shard) if shard is not None else None,
        gather_timeout_s=gather_timeout,
        lora_ranks=_int_list(lora_rank, "--lora-rank") if lora_rank else (),
        lora_only=lora_only,
    )
    with RichProgress() as progress:
        report = run_sweep(options, progress=progress)
    if report.rank not in (None, 0):
        done = sum(len(b) for b in report.results.values())
        print(f"moe-tune: rank {report.rank}: {done} buckets of {len(report.results)} problems tuned; "
              f"rank 0 writes the cache", file=sys.stderr)
        raise typer.Exit(1 if report.stopped or report.failed_buckets else 0)
    if json_output:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        _print_summary(report)
    failed = report.failed_buckets
    if report.stopped:
        print(f"moe-tune: {report.stopped}", file=sys.stderr)
    if failed:
        names = ", ".join(f"{b.problem.key}@{b.tokens}" for b in failed)
        print(f"moe-tune: no config passed the correctness gate for {names}", file=sys.stderr)
    if report.stopped or failed:
        raise typer.Exit(1)


def _lanes_available(interpret: bool) -> int:
    """How many indices --gpus may name: the visible GPUs, or the CPU cores under --interpret."""
    import os

    if interpret:
        return os.cpu_count() or 1
    import torch

    return torch.cuda.device_count()


def _print_summary(report) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from moe_tune.tuning.options import problem_label

    device = report.device
    table = Table(title=f"{report.model.name} on {device.name}: {report.options.dtype}, routing "
                        f"{report.options.routing}, {report.elapsed_s:.0f} s")
    for column in ("gemm", "pass", "tokens", "best config", "ms", "TFLOP/s", "vs default"):
        table.add_column(column, justify="left" if column in ("gemm", "pass", "best config") else "right")
    for problem, buckets in report.results.items():
        gemm = escape(problem_label(report.options, problem).split(".")[0])  # "[r16]" is no style tag
        for b in buckets:
            if b.ok:
                speedup = f"{b.speedup:.2f}x" if b.speedup else "-"
                tflops = f"{b.tflops:.1f}" if b.tflops is not None else "-"
                config = b.winner.short() + (" (default)" if b.winner == b.default else "")
                table.add_row(gemm, problem.pass_, str(b.tokens), config, f"{b.median_ms:.4g}", tflops, speedup)
            else:
                table.add_row(gemm, problem.pass_, str(b.tokens), "[red]no config passed[/red]", "-", "-", "-")
    console = Console()
    console.print(table)
    stats = report.stats.to_dict()
    console.print(f"cache: {report.cache_path or '(nothing written)'}")
    console.print(f"journal: {report.journal_path}")
    if len(report.lanes) > 1 or report.split["kind"] != "all":
        console.print(f"{len(report.lanes)} timing lane(s) ({', '.join(report.lanes)}), split {report.split['kind']} "
                      f"{report.split['index']}/{report.split['count']}")
    compiles = f"{stats['compiles']} compiles"
    if stats["compile_workers"]:
        compiles += f" on {stats['compile_workers']} processes ({stats['compile_wall_s']} s wall)"
    console.print(f"{stats['measurements']} measurements ({stats['failed_measurements']} failed, "
                  f"{stats['replayed_from_journal']} replayed from the journal), {compiles}, "
                  f"{stats['worker_restarts']} worker restarts")


def register(app: typer.Typer) -> None:
    app.command("sweep")(sweep)
