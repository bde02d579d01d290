"""Shared by the CPU and GPU integration tests: a Qwen3-MoE config from small fields and a pair of
sparse blocks with the same random weights, one on a transformers experts implementation and one
on moe-tune. Imports transformers: import it after ``pytest.importorskip("transformers")``."""

from __future__ import annotations

import copy

import torch
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from moe_tune.integrations.transformers import register


def qwen3_config(fields: dict, **overrides) -> Qwen3MoeConfig:
    return Qwen3MoeConfig(**{**fields, **overrides})


def block_pair(config, *, reference: str, std: float, device=None, dtype=None):
    """(transformers block running ``reference``, moe-tune block), same random weights."""
    register()
    torch.manual_seed(0)
    ref = Qwen3MoeSparseMoeBlock(copy.deepcopy(config))
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=std)
    if device is not None or dtype is not None:
        ref = ref.to(device, dtype)
    ours = copy.deepcopy(ref)
    ref.experts.config._experts_implementation = reference
    ours.experts.config._experts_implementation = "moe_tune"
    return ref, ours
