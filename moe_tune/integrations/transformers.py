"""moe-tune as a transformers v5 experts implementation.

    from moe_tune.integrations.transformers import register
    register()                                   # once per process, before the model runs
    model = AutoModelForCausalLM.from_pretrained(name, experts_implementation="moe_tune")
    # or, on a model already built: model.set_experts_implementation("moe_tune")

transformers v5 routes the forward of every experts module decorated with
``@use_experts_implementation`` through ``ExpertsInterface`` by the name in
``config._experts_implementation``, calling ``fn(self, hidden_states, top_k_index, top_k_weights)``.
``register`` adds ``experts_forward`` under a name; it reads the module's ``gate_up_proj``
``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]`` and runs ``moe_tune.moe_experts``, or, for
transformers' ``GptOssExperts``, its weights, biases, ``limit`` and ``alpha`` and runs
``moe_tune.ops.gptoss.gptoss_experts``.

Supported: the Qwen3-MoE family's layout (concatenated gate|up rows, weights stored ``[N, K]``, no
bias, SiLU, no custom gate, no expert parallelism) and gpt-oss's (``GptOssExperts``: weights
stored ``[K, N]``, biases, interleaved gate/up, its clamped SwiGLU; no expert parallelism, no
subclass with another gate). Any other layout raises ``UnsupportedExpertsLayout`` naming what
differs, never wrong numbers.

Importing this module does not import transformers; ``register`` does.
"""

from __future__ import annotations

import weakref

import torch
from torch.nn.utils import parametrize

from moe_tune.errors import InvalidInputError
from moe_tune.integrations import peft
from moe_tune.ops.gptoss import gptoss_experts
from moe_tune.ops.gptoss_lora import gptoss_experts_lora
from moe_tune.ops.moe_experts import moe_experts

DEFAULT_NAME = "moe_tune"

# transformers' names for SiLU in config.hidden_act
_SILU_NAMES = ("silu", "swish")


class UnsupportedExpertsLayout(InvalidInputError):
    """An experts module whose weight layout or activation moe-tune's block does not implement."""


def register(name: str = DEFAULT_NAME) -> str:
    """Register moe-tune in transformers' ``ExpertsInterface`` under ``name`` (idempotent) and
    return the name to pass as ``experts_implementation``."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError as exc:
        raise ImportError(
            "moe_tune.integrations.transformers needs transformers>=5 (ExpertsInterface); "
            "install it with: pip install 'transformers>=5'"
        ) from exc
    ExpertsInterface.register(name, experts_forward)
    # PEFT's LoRA on experts that run this implementation goes through the fused LoRA block.
    peft.install(name)
    return name


def _layout_problems(module: torch.nn.Module) -> list[str]:
    """What about ``module`` the block cannot run as stored, read from transformers'
    ``use_experts_implementation`` flags where present and from the module's tensors otherwise."""
    problems = []
    if not getattr(module, "has_gate", True) or not _holds_tensor(module, "gate_up_proj"):
        problems.append("no concatenated gate_up_proj (a non-gated MLP)")
    if not _holds_tensor(module, "down_proj"):
        problems.append("no down_proj tensor")
    if not getattr(module, "is_concatenated", True):
        problems.append("gate and up rows interleaved (is_concatenated=False)")
    if getattr(module, "is_transposed", False) or getattr(module, "experts_are_transposed", False):
        problems.append("weights stored transposed ([E, K, N], is_transposed=True)")
    has_bias = getattr(module, "has_bias", False) or any(
        getattr(module, name, None) is not None for name in ("gate_up_proj_bias", "down_proj_bias", "up_proj_bias")
    )
    if has_bias:
        problems.append("expert biases")
    if getattr(module, "has_post_expert_norm", False):
        problems.append("a post-expert norm")
    gate = getattr(type(module), "_apply_gate", None)
    if gate is not None and getattr(gate, "__name__", "") != "_default_apply_gate":
        problems.append(f"a custom gate ({type(module).__name__}._apply_gate)")
    act = _activation_name(module)
    if act not in _SILU_NAMES:
        problems.append(f"activation {act!r} (only SiLU, i.e. SwiGLU, is implemented)")
    if getattr(module, "_is_expert_parallel", False):
        problems.append("expert parallelism (sentinel expert ids)")
    return problems


def _is_gptoss(module: torch.nn.Module) -> bool:
    try:
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    except ImportError:  # a transformers without gpt-oss
        return False
    return isinstance(module, GptOssExperts)


def _gptoss_layout_problems(module: torch.nn.Module) -> list[str]:
    """What about a ``GptOssExperts`` (or a subclass) ``moe_tune.ops.gptoss`` cannot run."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    problems = []
    if type(module)._apply_gate is not GptOssExperts._apply_gate:
        problems.append(f"a gate other than gpt-oss's clamped SwiGLU ({type(module).__name__}._apply_gate)")
    flags = {"is_concatenated": False, "is_transposed": True, "has_bias": True, "has_gate": True,
             "has_post_expert_norm": False}
    for flag, expected in flags.items():
        if getattr(module, flag, expected) != expected:
            problems.append(f"{flag}={not expected} (gpt-oss's layout has {flag}={expected})")
    for name in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"):
        if not _holds_tensor(module, name):  # a parametrized (LoRA) weight is not read here
            problems.append(f"no {name} tensor")
    if getattr(module, "_is_expert_parallel", False):
        problems.append("expert parallelism (sentinel expert ids)")
    return problems


def _holds_tensor(module: torch.nn.Module, name: str) -> bool:
    # A parametrized weight (PEFT's LoRA) is a tensor; reading it would build W + ΔW.
    return parametrize.is_parametrized(module, name) or isinstance(getattr(module, name, None), torch.Tensor)


def _activation_name(module: torch.nn.Module) -> str:
    config = getattr(module, "config", None)
    name = getattr(config, "hidden_act", None)
    if isinstance(name, str):
        return name
    act = getattr(module, "act_fn", None)
    if isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation":
        return "silu"
    return type(act).__name__


def check_layout(module: torch.nn.Module) -> None:
    """Raise ``UnsupportedExpertsLayout`` unless ``module`` is an experts module moe-tune runs."""
    problems = _gptoss_layout_problems(module) if _is_gptoss(module) else _layout_problems(module)
    if problems:
        raise UnsupportedExpertsLayout(
            f"experts_implementation='moe_tune' does not support {type(module).__name__}: "
            + "; ".join(problems)
            + ". Use experts_implementation='grouped_mm' for this model."
        )


# Experts modules whose layout passed ``check_layout``, each with the ``_layout_key`` it was checked
# under. The check reads some twenty module attributes (~15 µs of host time per forward); a
# module's layout changes only with its class (a parametrization swaps it), its parameters or its
# submodules, which the key holds.
_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _layout_key(module: torch.nn.Module) -> tuple:
    return type(module), tuple(module._parameters), tuple(module._modules)


def _check_layout_once(module: torch.nn.Module) -> None:
    """``check_layout``, run again only when ``_layout_key`` changed; under torch.compile always
    (it runs once, at trace time)."""
    if torch.compiler.is_compiling():
        check_layout(module)
        return
    key = _layout_key(module)
    if _CHECKED.get(module) != key:
        check_layout(module)
        _CHECKED[module] = key


def _as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def experts_forward(self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' experts signature: ``hidden_states [T, H]``, ``top_k_index [T, k]``,
    ``top_k_weights [T, k]`` → ``[T, H]`` in ``hidden_states``' dtype."""
    _check_layout_once(self)
    # Like transformers' grouped_mm path: activations may arrive in float32 under autocast.
    if _is_gptoss(self):
        # Under PEFT's LoRA: the frozen weights and the LoRA factors, never W + ΔW.
        gate_up_w, down_w, lora = peft.experts_weights(self)
        args = (_as_dtype(hidden_states, gate_up_w.dtype), gate_up_w, self.gate_up_proj_bias, down_w,
                self.down_proj_bias, top_k_index, top_k_weights)
        if lora is None:
            out = gptoss_experts(*args, limit=self.limit, alpha=self.alpha)
        else:
            out = gptoss_experts_lora(*args, lora=lora, limit=self.limit, alpha=self.alpha)
        return _as_dtype(out, hidden_states.dtype)
    # Under PEFT's LoRA: the frozen weights and the LoRA factors, never W + ΔW.
    gate_up_w, down_w, lora = peft.experts_weights(self)
    out = moe_experts(_as_dtype(hidden_states, gate_up_w.dtype), gate_up_w, down_w, top_k_index, top_k_weights,
                      activation="silu", lora=lora)
    return _as_dtype(out, hidden_states.dtype)
