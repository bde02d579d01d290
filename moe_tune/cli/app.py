"""The ``moe-tune`` command: one Typer app, one module per command group, one error boundary.

Data goes to stdout, progress and warnings to stderr. Known errors become one line on stderr and
an exit code: 0 ok, 1 a failure (a stale ``verify``, a failed sweep), 2 bad input (missing or
malformed file, unknown model, no GPU). ``MOE_TUNE_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, Optional

import typer

from moe_tune import __version__
from moe_tune.errors import CacheError, InvalidInputError, MoeTuneError, NoGPUError

app = typer.Typer(
    name="moe-tune",
    help="Offline tuning, caches and a runtime loader for MoE grouped-GEMM Triton kernels.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"moe-tune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool],
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = None,
) -> None:
    """Offline tuning, caches and a runtime loader for MoE grouped-GEMM Triton kernels."""


def _register_commands() -> None:
    # Each command module adds its commands to `app`; importing them here keeps the list in one place.
    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(f"moe_tune.cli.{name}").register(app)


COMMAND_MODULES: tuple[str, ...] = ("show", "pack", "models", "sweep", "doctor", "verify", "bench")

EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2


def exit_code_for(exc: MoeTuneError) -> int:
    if isinstance(exc, (InvalidInputError, CacheError, NoGPUError)):
        return EXIT_BAD_INPUT
    return EXIT_FAILURE


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app inside the error boundary."""
    _register_commands()
    try:
        # Typer's standalone mode prints usage errors itself (exit 2) and exits via SystemExit.
        app(args=argv)
    except MoeTuneError as exc:
        if os.environ.get("MOE_TUNE_DEBUG") == "1":
            raise
        print(f"moe-tune: error: {exc}", file=sys.stderr)
        sys.exit(exit_code_for(exc))
