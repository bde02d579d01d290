"""Runtime config loader (placeholder until the cache lands): the heuristic default."""

from __future__ import annotations

from moe_tune.device import DeviceInfo
from moe_tune.problem import KernelConfig, Problem


def get_config(problem: Problem, num_tokens: int, device: DeviceInfo | None = None) -> KernelConfig:
    from moe_tune.space import default_config

    return default_config(problem, device)
