"""The causal LM that the training-step section trains: N decoder layers of the preset's model
family, with the preset's expert shapes and random weights (nothing is downloaded).

Data flow: ``step_skip_reason`` (None when the family has a transformers config here) →
``lm_config`` — the family's config class with its own defaults for attention sizes, the preset's
E, H, I and k, N layers, every layer an MoE layer, and a moderate vocabulary
(``min(family default, vocab)``: at Qwen3's 151936 entries the LM head alone would cost four
times the FLOPs of both experts blocks, and the section is about the experts) → ``build_lm`` — the
model built on the device in the dtype, re-initialised from one seeded generator (N(0, 0.02)
matrices, unit norms): the master every run deep-copies, so every implementation and mode starts from the same
weights → ``prepare_mode`` — the copy set to one experts implementation and one training mode
(full, expert weights frozen, or PEFT LoRA on the expert weights) → ``describe`` — the sizes and
the share of matmul FLOPs per part, for the report's caption.

Imports transformers (and PEFT for LoRA) inside its functions.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from moe_tune.problem import MoeShape

LAYERS = 2
# LM head: ~25% of the forward's matmul FLOPs of the 2-layer Qwen3-30B-A3B-shaped model at this
# vocabulary, ~72% at the family's 151936.
VOCAB = 16384
SEQ_LEN = 2048  # tokens per sequence; a step of T tokens is T / SEQ_LEN sequences
LORA_RANK = 16
# PEFT >= 0.17 wraps 3-D parameters named here (``peft.tuners.lora.layer.ParamWrapper``).
LORA_TARGETS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
PEFT_MIN_VERSION = (0, 17)
INIT_STD = 0.02


def _qwen3_experts(s: MoeShape) -> dict[str, Any]:
    return dict(hidden_size=s.H, moe_intermediate_size=s.I, num_experts=s.E, num_experts_per_tok=s.topk,
                norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])


@dataclass(frozen=True)
class LmFamily:
    """How to build one model family's causal LM: its transformers config class, the config fields
    that carry the expert shapes, and fixed fields (the tiny preset's attention)."""

    config_class: str
    experts: Callable[[MoeShape], dict[str, Any]]
    fixed: Mapping[str, Any] = field(default_factory=dict)


# Families whose transformers experts module moe-tune runs: the Qwen3-MoE layout
# (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``, SwiGLU, no bias) and gpt-oss's.
LM_FAMILIES = {
    "qwen3_moe": LmFamily("Qwen3MoeConfig", _qwen3_experts),
    # The tiny preset: Qwen3-MoE with attention small enough for Triton's CPU interpreter.
    "test": LmFamily("Qwen3MoeConfig", _qwen3_experts,
                     dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256)),
    "olmoe": LmFamily("OlmoeConfig", lambda s: dict(hidden_size=s.H, intermediate_size=s.I, num_experts=s.E,
                                                    num_experts_per_tok=s.topk)),
    "mixtral": LmFamily("MixtralConfig", lambda s: dict(hidden_size=s.H, intermediate_size=s.I,
                                                        num_local_experts=s.E, num_experts_per_tok=s.topk)),
    # gpt-oss's own layout (transposed weights, biases, interleaved clamped SwiGLU): the
    # integration runs it through moe_tune.ops.gptoss.
    "gpt_oss": LmFamily("GptOssConfig", lambda s: dict(hidden_size=s.H, intermediate_size=s.I,
                                                       num_local_experts=s.E, num_experts_per_tok=s.topk)),
}


def graphed_rows(family: str, device: str) -> bool:
    """Whether the eager steps get a row of moe-tune with its CUDA graphs around the experts block:
    on CUDA, for the families whose experts run ``moe_tune.ops.moe_experts`` (gpt-oss's block has no
    graphed path)."""
    return device == "cuda" and family != "gpt_oss"


def step_skip_reason(family: str, model: str) -> str | None:
    """Why the training-step section cannot run for ``model`` here (None: it can)."""
    from moe_tune.bench.block import transformers_missing

    if family not in LM_FAMILIES:
        return (f"the training-step section builds a {', '.join(f for f in LM_FAMILIES if f != 'test')} causal LM; "
                f"{model} is a {family} model")
    missing = transformers_missing()
    if missing:
        return missing
    import transformers

    if not hasattr(transformers, LM_FAMILIES[family].config_class):
        return f"transformers {transformers.__version__} has no {LM_FAMILIES[family].config_class}"
    return None


def lora_skip_reason() -> str | None:
    """Why the LoRA mode cannot run here (None: PEFT with ``target_parameters`` is installed)."""
    if importlib.util.find_spec("peft") is None:
        return "peft is not installed (pip install 'moe-tune[peft]')"
    version = importlib.metadata.version("peft")
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if parts < PEFT_MIN_VERSION:
        return f"peft {version} cannot target expert parameters (target_parameters needs peft >= 0.17)"
    return None


def lm_config(shape: MoeShape, family: str, layers: int = LAYERS, vocab: int = VOCAB, seq_len: int = SEQ_LEN):
    import transformers

    spec = LM_FAMILIES[family]
    cls = getattr(transformers, spec.config_class)
    defaults = cls()
    fields = {"vocab_size": min(defaults.vocab_size, vocab), **spec.experts(shape), **spec.fixed}
    # Random token ids carry no special tokens; the families' own ids may lie past the capped vocabulary.
    return cls(**fields, num_hidden_layers=layers,
               max_position_embeddings=max(defaults.max_position_embeddings, seq_len), use_cache=False,
               tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def head_dim(config) -> int:
    """What the attention modules use: ``config.head_dim`` when set, else hidden / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def describe(config, family: str, shape: MoeShape, seq_len: int) -> dict[str, Any]:
    """Sizes of the LM and each part's share of the forward's matmul FLOPs per token (experts:
    k experts' gate/up and down; attention: projections and causal scores at ``seq_len``; LM head;
    router), so a step's speed-up can be read against the part moe-tune changes."""
    H, d = config.hidden_size, head_dim(config)
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    per_layer = {"experts": 2 * shape.topk * 3 * H * shape.I,
                 "attention": 2 * H * (2 * q + 2 * kv) + 2 * seq_len * q,  # causal: half of QK^T and PV
                 "router": 2 * H * shape.E}
    flops = {name: config.num_hidden_layers * value for name, value in per_layer.items()}
    flops["lm_head"] = 2 * H * config.vocab_size
    total = sum(flops.values())
    return {"family": family, "config": type(config).__name__, "layers": config.num_hidden_layers,
            "hidden": H, "heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
            "head_dim": d, "vocab": config.vocab_size, "seq_len": seq_len,
            "attention": getattr(config, "_attn_implementation", None) or "sdpa",
            "lora_rank": LORA_RANK, "optimizer": OPTIMIZER,
            "flop_share": {name: value / total for name, value in flops.items()}}


LEARNING_RATE = 1e-5
# What the step trains with: HF Trainer's default optimizer since transformers 4.5x on torch >= 2.8
# ("adamw_torch_fused", one fused kernel per parameter group); off CUDA torch's default AdamW.
OPTIMIZER = "torch.optim.AdamW (fused=True on CUDA, HF Trainer's default 'adamw_torch_fused'; lr 1e-5)"


def make_optimizer(params, device: str):
    """The step's AdamW (see ``OPTIMIZER``)."""
    import torch

    return torch.optim.AdamW(params, lr=LEARNING_RATE, fused=True if device == "cuda" else None)


def build_lm(config, dtype: str, device: str, seed: int = 0):
    """The causal LM on ``device`` in ``dtype``, every weight drawn from one seeded generator."""
    import torch
    from transformers import AutoModelForCausalLM

    from moe_tune.bench.gemms import torch_dtype
    from moe_tune.integrations.transformers import register

    register()
    # Built in the dtype, as from_pretrained does: a cast afterwards would also round RoPE's float32
    # inv_freq buffer to bfloat16.
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype))
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:  # embeddings, projections, router, expert stacks, LM head
                param.normal_(0.0, INIT_STD, generator=gen)
            elif "norm" in name:
                param.fill_(1.0)
            else:
                param.zero_()
    return model


def is_expert_weight(name: str) -> bool:
    """An expert weight stack (``model.layers.3.mlp.experts.down_proj``): what LoRA targets."""
    return name.endswith(tuple("." + t for t in LORA_TARGETS))


def check_step_tokens(tokens: tuple[int, ...], seq_len: int) -> None:
    """``InvalidInputError`` unless each token count fills whole sequences of ``seq_len`` (or is
    one shorter sequence)."""
    from moe_tune.errors import InvalidInputError

    for t in tokens:
        if t > seq_len and t % seq_len:
            raise InvalidInputError(f"--step runs {t} tokens as sequences of {seq_len} (--step-seq-len): "
                                    f"{t} is not a multiple of {seq_len}")


def prepare_mode(model, implementation: str, mode: str, seed: int = 0):
    """``model`` (a fresh copy) set to transformers' ``implementation`` and training ``mode``:
    ``full`` trains everything; ``frozen`` leaves the expert weight stacks without gradients;
    ``lora`` wraps them in PEFT LoRA adapters of rank ``LORA_RANK`` (the base frozen, as PEFT does).
    Returns the model to train (a ``PeftModel`` for LoRA)."""
    import torch

    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(implementation)
    else:
        model.config._experts_implementation = implementation
    model.train()
    if mode == "frozen":
        for name, param in model.named_parameters():
            if is_expert_weight(name):
                param.requires_grad_(False)
    elif mode == "lora":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)  # PEFT draws lora_A from the global generator: the same adapters for every run
        model = get_peft_model(model, LoraConfig(r=LORA_RANK, target_parameters=list(LORA_TARGETS)))
    elif mode != "full":
        raise ValueError(f"unknown training mode {mode!r}")
    return model


def token_batch(config, tokens: int, seq_len: int, device: str, seed: int = 0):
    """``tokens`` random token ids as ``[tokens // seq_len, seq_len]`` (one sequence when fewer)."""
    import torch

    seq = min(seq_len, tokens)
    gen = torch.Generator(device=device).manual_seed(seed + tokens)
    return torch.randint(0, config.vocab_size, (tokens // seq, seq), generator=gen, device=device)
