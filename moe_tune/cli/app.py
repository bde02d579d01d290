"""The ``moe-tune`` command: one Typer app, one module per command group, one error boundary.

Data goes to stdout, progress and warnings to stderr. Known errors become one line on stderr and
an exit code: 0 ok, 1 a failure (a stale ``verify``, a failed sweep), 2 bad input (missing or
malformed file, unknown model, no GPU, a usage error such as an unknown option). ``main`` is that
boundary: it runs the app in Click's non-standalone mode so that usage errors reach it too, instead
of Typer's multi-line box. ``MOE_TUNE_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Annotated, Optional

import typer

from moe_tune._version import __version__
from moe_tune.errors import CacheError, InvalidInputError, MoeTuneError, NoGPUError

PROG_NAME = "moe-tune"

app = typer.Typer(
    name=PROG_NAME,
    help="Offline tuning, caches and a runtime loader for MoE grouped-GEMM Triton kernels.",
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help, as Click prints it. Typer's rich help parses help text as markup, which ate
    # every "[default: …]" written into it, and shows each boolean flag as "--json <bool>".
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"moe-tune {__version__}")
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: Annotated[
        Optional[bool],
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = None,
) -> None:
    """Offline tuning, caches and a runtime loader for MoE grouped-GEMM Triton kernels."""
    # No command: the help, exit 0 (Click's own no_args_is_help became a usage error, exit 2, in 8.2).
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit()


@functools.cache
def _register_commands() -> None:
    # Each command module adds its commands to `app`; importing them here keeps the list in one place.
    # Once per process: main() runs many times in one test session, and Typer rebuilds the Click
    # group from every registration on each run.
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


def one_line(message: str) -> str:
    """``message`` with every non-printable character escaped: a path or a value read from a
    hostile file can hold newlines or terminal escape sequences, and an error is one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


def _click_error() -> type[Exception]:
    # The base class of Click's usage errors, from the Click this Typer runs on: Typer 0.2x
    # vendors it as typer._click, earlier releases use the click package.
    try:
        from typer._click.exceptions import ClickException
    except ImportError:
        from click.exceptions import ClickException
    return ClickException


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app inside the error boundary."""
    _register_commands()
    try:
        # Non-standalone: usage errors raise here instead of printing Typer's box; --help and
        # typer.Exit come back as the exit code.
        code = app(args=argv, prog_name=PROG_NAME, standalone_mode=False)
    except MoeTuneError as exc:
        if os.environ.get("MOE_TUNE_DEBUG") == "1":
            raise
        print(f"{PROG_NAME}: error: {one_line(str(exc))}", file=sys.stderr)
        sys.exit(exit_code_for(exc))
    except _click_error() as exc:
        if os.environ.get("MOE_TUNE_DEBUG") == "1":
            raise
        context = getattr(exc, "ctx", None)
        hint = f" (see `{context.command_path} --help`)" if context is not None else ""
        print(f"{PROG_NAME}: error: {one_line(exc.format_message())}{hint}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except typer.Abort:
        print(f"{PROG_NAME}: aborted", file=sys.stderr)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
