"""Plain-torch reference of the experts block with LoRA (``moe_tune.moe_experts(..., lora=...)``).

It builds W + ΔW, which the block never does, and runs ``reference_moe_experts`` on it: slow and
memory-hungry on purpose, differentiable in the LoRA factors, float64 by default.
"""

from __future__ import annotations

import torch

from moe_tune.reference.moe_experts import reference_moe_experts


def _adapted(weight: torch.Tensor, factors, dtype: torch.dtype) -> torch.Tensor:
    w = weight.to(dtype)
    if factors is None:
        return w
    return w + factors.scaling * torch.bmm(factors.lora_B.to(dtype), factors.lora_A.to(dtype))


def reference_moe_experts_lora(hidden, gate_up_w, down_w, top_k_index, top_k_weights, lora, *,
                               dtype=torch.float64) -> torch.Tensor:
    """``reference_moe_experts`` on ``W + scaling·B·A`` per expert for each weight ``lora`` adapts
    (``lora``: a ``moe_tune.ops.lora.MoeLora``). Returns ``dtype``."""
    return reference_moe_experts(hidden, _adapted(gate_up_w, lora.gate_up, dtype), _adapted(down_w, lora.down, dtype),
                                 top_k_index, top_k_weights, dtype=dtype)
