"""Shared by the CPU and GPU PEFT tests: a tiny Qwen3-MoE causal LM under PEFT's LoRA on the expert
parameters, twice with the same weights and adapters (one per experts implementation). Imports
transformers and peft: import it after ``pytest.importorskip`` of both."""

from __future__ import annotations

import copy

import torch
from peft import LoraConfig, get_peft_model
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeForCausalLM

from moe_tune.integrations.transformers import register

EXPERT_TARGETS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def lora_config(targets=EXPERT_TARGETS, r: int = 4, **overrides) -> LoraConfig:
    # init_lora_weights=False: PEFT would start B at zero, hiding every mistake on B's side.
    fields = dict(r=r, lora_alpha=2 * r, target_parameters=list(targets), init_lora_weights=False)
    return LoraConfig(**{**fields, **overrides})


def peft_pair(fields: dict, *, reference: str, targets=EXPERT_TARGETS, r: int = 4, device=None, dtype=None,
              **lora_overrides):
    """(PEFT model on ``reference`` experts, PEFT model on moe-tune), same weights and adapters."""
    register()
    torch.manual_seed(0)
    base = Qwen3MoeForCausalLM(Qwen3MoeConfig(**fields))
    if device is not None or dtype is not None:
        base = base.to(device, dtype)
    ref = get_peft_model(base, lora_config(targets, r, **lora_overrides))
    ours = copy.deepcopy(ref)
    ref.base_model.model.set_experts_implementation(reference)
    ours.base_model.model.set_experts_implementation("moe_tune")
    return ref, ours


def loss_and_grads(model, ids):
    """(loss, {name: grad} of every trainable parameter) of one forward and backward."""
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def expert_stack_shapes(model) -> set[tuple[int, ...]]:
    """Shapes of the expert weight stacks ([E, 2I, H] and [E, H, I]): W + ΔW would have one."""
    config = model.base_model.model.config
    E, H, I = config.num_experts, config.hidden_size, config.moe_intermediate_size
    return {(E, 2 * I, H), (E, H, I)}
