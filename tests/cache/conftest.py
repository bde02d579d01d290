"""Fixtures for the cache tests: a fresh seed per test (printed, so a failure can be replayed)."""

from __future__ import annotations

import random

import pytest


@pytest.fixture
def rng() -> random.Random:
    seed = random.SystemRandom().getrandbits(32)
    print(f"seed={seed}")
    return random.Random(seed)
