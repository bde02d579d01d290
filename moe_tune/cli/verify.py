"""``moe-tune verify``: re-time a sample of cached entries on this GPU; exit 1 when any is stale.

Data flow: flags → ``tuning.verify.run_verify`` → a table (or JSON with ``--json``) on stdout of
each sampled entry: recorded time, time now, the heuristic default's time now, verdict.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from moe_tune.cli.options import CacheDirOption, JsonOption
from moe_tune.errors import NoGPUError
from moe_tune.tuning.verify import DEFAULT_MARGIN, DEFAULT_TOLERANCE


def verify(
    sample: Annotated[int, typer.Option("--sample", help="How many cached entries to re-time.", min=1)] = 8,
    tolerance: Annotated[float, typer.Option(
        "--tolerance", help="Stale when slower than recorded by more than this fraction.", min=0.0)] = DEFAULT_TOLERANCE,
    default_margin: Annotated[float, typer.Option(
        "--default-margin", help="Stale when slower than the heuristic default by more than this fraction.",
        min=0.0)] = DEFAULT_MARGIN,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the sample and of the inputs.")] = 0,
    interpret: Annotated[bool, typer.Option(
        "--interpret", help="Verify the interpreter's cache entries on the CPU (pipeline check only).")] = False,
    cache_dir: CacheDirOption = None,
    json_output: JsonOption = False,
) -> None:
    """Re-time cached configs on this GPU and report entries that are now stale (exit 1 if any)."""
    from moe_tune.tuning.verify import run_verify

    if not interpret:
        _require_gpu()

    device, found, verdicts = run_verify(cache_dir=cache_dir, sample=sample, seed=seed, tolerance=tolerance,
                                         default_margin=default_margin, interpret=interpret)
    stale = [v for v in verdicts if v.stale]
    if json_output:
        typer.echo(json.dumps({"device": device.to_dict(), "entries_found": found, "sampled": len(verdicts),
                               "stale": len(stale), "verdicts": [v.to_dict() for v in verdicts]}, indent=2))
    else:
        _print(device, found, verdicts)
    if not found:
        print(f"moe-tune: no cached entries for {device.name}; nothing to verify", file=sys.stderr)
    if stale:
        print(f"moe-tune: {len(stale)} of {len(verdicts)} sampled entries are stale: re-run `moe-tune sweep` "
              "for their problems", file=sys.stderr)
        raise typer.Exit(1)


def _require_gpu() -> None:
    # Checked here so that the message names this command (the engine's own check speaks for sweep).
    try:
        import torch
    except ImportError:
        raise NoGPUError("`moe-tune verify` needs torch with a CUDA GPU; torch is not installed") from None
    if not torch.cuda.is_available():
        raise NoGPUError("no CUDA GPU is visible: `moe-tune verify` re-times cached configs on the GPU it runs on "
                         "(try `--interpret` for a CPU check of the pipeline)")


def _print(device, found: int, verdicts) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(verdicts)} of {found} cached entries re-timed on {device.name}")
    for column in ("problem", "tokens", "config", "recorded ms", "now ms", "default ms", "verdict"):
        table.add_column(column, justify="right" if "ms" in column or column == "tokens" else "left")

    def ms(value):
        return f"{value:.4g}" if value is not None else "-"

    for v in verdicts:
        verdict = "ok" if not v.stale else f"[red]{v.status}[/red]"
        table.add_row(v.problem.key, str(v.tokens), v.config.short(), ms(v.recorded_ms), ms(v.now_ms),
                      ms(v.default_ms), verdict)
    Console().print(table)


def register(app: typer.Typer) -> None:
    app.command("verify")(verify)
