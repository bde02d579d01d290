"""The launchers' grid arithmetic (``moe_tune.ops.launch.cdiv``, ``next_power_of_2``) gives
Triton's own values (``triton.cdiv``, ``triton.next_power_of_2``, host-side costlier), on fresh
random sizes and the edges (1, powers of two and their neighbours), also on a torch.SymInt."""

from __future__ import annotations

import random

import torch
import triton

from moe_tune.ops.launch import cdiv, next_power_of_2


def test_next_power_of_2_matches_triton(rng: random.Random):
    edges = [1, 2, 3] + [p + d for p in (2**i for i in range(2, 20)) for d in (-1, 0, 1)]
    for n in edges + [rng.randrange(1, 2**24) for _ in range(500)]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n


def test_cdiv_matches_triton(rng: random.Random):
    for _ in range(1000):
        a, b = rng.randrange(0, 2**31), rng.choice([1, 16, 32, 64, 128, rng.randrange(1, 4096)])
        assert cdiv(a, b) == triton.cdiv(a, b), (a, b)


def test_cdiv_on_a_symbolic_size():
    """Under torch.compile with dynamic shapes the row count is a SymInt: the grid stays symbolic
    and evaluates to Triton's value."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    shape_env = ShapeEnv()
    rows = shape_env.create_symintnode(shape_env.create_symbol(3000, ConstantSource("rows")), hint=3000)
    grid = cdiv(rows, 64)
    assert isinstance(grid, torch.SymInt)
    assert int(grid) == triton.cdiv(3000, 64)
