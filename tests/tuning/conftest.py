"""Fixtures for the tuning tests: isolated cache layers (tmp dirs through ``paths.override_roots``). Kernels run in Triton's
interpreter here (``tests/conftest.py`` sets TRITON_INTERPRET before anything imports them), and
so do the worker processes the sweep spawns: they inherit the environment."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from moe_tune.cache import paths


@pytest.fixture(autouse=True)
def layers(tmp_path, monkeypatch):
    monkeypatch.delenv(paths.ENV_CACHE_DIR, raising=False)
    roots = SimpleNamespace(user=tmp_path / "user", shipped=tmp_path / "shipped")
    with paths.override_roots(user=roots.user, shipped=roots.shipped):
        yield roots
