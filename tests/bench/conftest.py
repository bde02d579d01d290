"""Fixtures for the benchmark tests: isolated
cache layers (tmp dirs through ``paths.override_roots``) and a clean runtime memo."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from moe_tune import runtime
from moe_tune.cache import paths


@pytest.fixture(autouse=True)
def layers(tmp_path, monkeypatch):
    monkeypatch.delenv(paths.ENV_CACHE_DIR, raising=False)
    monkeypatch.delenv(runtime.ENV_STRICT, raising=False)
    roots = SimpleNamespace(user=tmp_path / "user", shipped=tmp_path / "shipped")
    with paths.override_roots(user=roots.user, shipped=roots.shipped):
        runtime.set_cache_dir(None)
        yield roots
    runtime.set_cache_dir(None)
