"""PEFT's flat LoRA parameters for an expert stack (what ``ParamWrapper`` holds), built from
per-expert factors; ``LoraFactors.from_peft`` turns them back into per-expert views."""

from __future__ import annotations

import torch


def peft_flat(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A [E·r, in], lora_B [out, r·E]) holding ``a`` [E, r, in] and ``b`` [E, out, r]; the
    lora_B view is permuted (strides (1, r·E, E)), as PEFT's is."""
    E, r, fan_in = a.shape
    return a.reshape(E * r, fan_in), b.permute(1, 2, 0).reshape(b.shape[1], r * E)
