"""Fixtures for the CLI tests: isolated cache layers (tmp dirs through the documented
``paths.override_roots`` hook) and ``cli`` — the real entry point ``main`` (with
its error boundary) run inside ``typer.testing.CliRunner``'s isolation, stdout and stderr apart."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from moe_tune import runtime
from moe_tune.cache import paths
from moe_tune.cli.app import main


@pytest.fixture(autouse=True)
def layers(tmp_path, monkeypatch):
    monkeypatch.delenv(paths.ENV_CACHE_DIR, raising=False)
    monkeypatch.delenv("MOE_TUNE_STRICT", raising=False)
    monkeypatch.delenv("MOE_TUNE_DEBUG", raising=False)
    roots = SimpleNamespace(env=tmp_path / "env", user=tmp_path / "user", shipped=tmp_path / "shipped")
    with paths.override_roots(user=roots.user, shipped=roots.shipped):
        runtime.reset()
        yield roots
    runtime.reset()


@pytest.fixture
def cli():
    def run(*args: str, env: dict | None = None) -> SimpleNamespace:
        runner = CliRunner()
        with runner.isolation(env=env) as streams:
            out, err = streams[0], streams[1]
            try:
                main([str(a) for a in args])
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            # The isolation's text wrappers buffer: flush before reading the bytes underneath.
            sys.stdout.flush()
            sys.stderr.flush()
            return SimpleNamespace(code=code, stdout=out.getvalue().decode(), stderr=err.getvalue().decode())

    return run
