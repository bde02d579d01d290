"""Fixtures for the runtime tests: every test gets its own env, user and shipped layers (tmp
dirs, through the documented ``paths.override_roots`` hook), no strict mode and a clean memo."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from moe_tune import runtime
from moe_tune.cache import paths


@pytest.fixture(autouse=True)
def layers(tmp_path, monkeypatch):
    monkeypatch.delenv(paths.ENV_CACHE_DIR, raising=False)
    monkeypatch.delenv(runtime.ENV_STRICT, raising=False)
    roots = SimpleNamespace(env=tmp_path / "env", user=tmp_path / "user", shipped=tmp_path / "shipped",
                            explicit=tmp_path / "explicit")
    with paths.override_roots(user=roots.user, shipped=roots.shipped):
        runtime.set_cache_dir(None)
        yield roots
    runtime.set_cache_dir(None)
