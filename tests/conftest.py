"""Test-wide setup: without a CUDA GPU, kernels run in Triton's CPU interpreter; ``rng`` gives
every test a fresh, printed seed.

TRITON_INTERPRET must be set before triton decorates the kernels, i.e. before moe_tune.kernels
is imported, which is why it happens here at collection time.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture
def rng() -> random.Random:
    """A fresh seed per test, printed so a failure can be replayed."""
    seed = random.SystemRandom().getrandbits(32)
    print(f"seed={seed}")
    return random.Random(seed)
