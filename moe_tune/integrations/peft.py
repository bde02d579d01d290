"""PEFT's LoRA on the experts, run by moe-tune's fused LoRA block instead of PEFT's W + ΔW.

    from moe_tune.integrations.transformers import register
    register()          # also calls install() below when peft is importable
    model = get_peft_model(model, LoraConfig(target_parameters=["mlp.experts.gate_up_proj",
                                                                "mlp.experts.down_proj"]))
    model.set_experts_implementation("moe_tune")

How PEFT runs LoRA on a 3-D expert parameter (peft ≥ 0.17, ``ParamWrapper``): every forward,
``ParamWrapper._activate_lora`` registers a ``torch.nn.utils.parametrize`` parametrization on the
experts module, so reading ``module.gate_up_proj`` yields W + ΔW for the whole stack. Registering
it already evaluates it once (torch checks a parametrization's shape and dtype unless
``unsafe=True``), and the experts forward evaluates it again; float8 weights or several adapters
get an eager delta before the experts run. Registering a parametrization swaps the module's class
and re-seats the parameter in place, which torch.compile cannot trace: two graph breaks per
wrapped weight and forward.

``install`` replaces ``ParamWrapper._activate_lora`` with a version that, for an experts module
whose ``config._experts_implementation`` is one registered by moe-tune, touches neither the
module's class nor its parameters: for the duration of the wrapper's forward it sets one plain
attribute on the experts module naming the active (wrapper, adapter) per weight, so torch.compile
traces the whole forward (no graph break). moe-tune's ``experts_forward`` then reads the frozen
weights and those wrappers' factors (``experts_weights``) and runs the fused LoRA block:
``moe_tune.moe_experts(..., lora=...)`` for weights stored ``[E, N, K]`` (the Qwen3-MoE family),
``moe_tune.ops.gptoss_lora.gptoss_experts_lora`` for weights stored ``[E, K, N]`` (gpt-oss). W + ΔW is never
built and no base dW runs. What that trades: code other than the experts forward that reads
``module.gate_up_proj`` inside the wrapper's forward (a hook, say) sees the frozen weight, not
PEFT's W + ΔW. Every other experts implementation keeps PEFT's original code path, untouched.

What the fused block does not run but PEFT computes right — several active adapters, weights of a
type the kernels do not take (float8) — keeps PEFT's own path (W + ΔW into moe-tune's plain block),
as long as both expert weights of the module take it. What neither runs right raises
``UnsupportedLoraAdapter`` before the experts run: DoRA or other LoRA variants, LoRA dropout, a
LoRA bias, another parametrization under the LoRA, one weight fused and the other not. A merged or
disabled adapter never activates: the experts run on the (merged) base weights, as in PEFT. The
adapter's parameters stay PEFT's (the factors are views of ``lora_A``/``lora_B`` weights), so
saving and loading adapters is PEFT's business as before.

Importing this module imports neither peft nor transformers; ``install`` imports peft.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.utils import parametrize

from moe_tune.errors import InvalidInputError
from moe_tune.ops.lora import LoraFactors, MoeLora

# Names under which moe-tune's experts_forward is registered in transformers' ExpertsInterface.
_FUSED_IMPLEMENTATIONS: set[str] = set()
# PEFT's own ParamWrapper._activate_lora, kept for every module moe-tune does not run.
_peft_activate_lora = None

_WEIGHTS = ("gate_up_proj", "down_proj")


class UnsupportedLoraAdapter(InvalidInputError):
    """A PEFT adapter on the experts that the fused LoRA path cannot compute."""


def install(implementation: str) -> bool:
    """Route PEFT's LoRA on experts modules running ``implementation`` through moe-tune's fused
    LoRA block (idempotent). Returns False, changing nothing, when peft is not installed."""
    global _peft_activate_lora
    try:
        from peft.tuners.lora.layer import ParamWrapper
    except ImportError:
        return False
    if not hasattr(ParamWrapper, "_activate_lora"):
        raise ImportError("moe_tune.integrations.peft needs peft>=0.17 (ParamWrapper._activate_lora); "
                          "install it with: pip install 'peft>=0.17'")
    _FUSED_IMPLEMENTATIONS.add(implementation)
    if _peft_activate_lora is None:
        _peft_activate_lora = ParamWrapper._activate_lora
        ParamWrapper._activate_lora = _activate_lora
    return True


# The experts module's attribute naming its active LoRA while a ParamWrapper's forward runs: a
# tuple of (weight name, wrapper, adapter), set and restored by ``_activate_lora``.
_ACTIVE = "_moe_tune_lora"

# Weight dtypes the fused block runs (PEFT's float8 expert weights keep its own path).
_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _runs_fused(module: torch.nn.Module) -> bool:
    implementation = getattr(getattr(module, "config", None), "_experts_implementation", None)
    return implementation in _FUSED_IMPLEMENTATIONS


def _unsupported(wrapper, adapter: str) -> str | None:
    """Why neither the fused block nor PEFT's own path computes this adapter of ``wrapper`` right
    (None: the fused block runs it)."""
    where = f"LoRA on {type(wrapper.get_base_layer()).__name__}.{wrapper.parameter_name}"
    if wrapper.use_dora.get(adapter) or adapter in getattr(wrapper, "lora_variant", {}):
        return f"{where}: DoRA and other LoRA variants are not supported by the fused path"
    dropout = wrapper.lora_dropout[adapter]
    if not isinstance(dropout, torch.nn.Identity) and getattr(dropout, "p", 1.0) != 0:
        return (f"{where}: LoRA dropout must be 0 (dropout acts on x before A, which the fused path never "
                "materialises per expert)")
    if wrapper.lora_bias.get(adapter):
        return f"{where}: a LoRA bias (lora_bias=True) is not supported"
    return None


def _runs_fused_lora(wrapper, adapters: list[str]) -> bool:
    """Whether the fused LoRA block runs ``wrapper``'s active ``adapters`` (True), or PEFT's own
    W + ΔW path does (False: several active adapters, weights of a type the kernels do not take,
    a one-expert ``[E, K, N]`` stack, whose delta PEFT builds as a plain Linear's). Raises
    ``UnsupportedLoraAdapter`` for what neither computes right (``_unsupported``)."""
    if len(adapters) > 1 or wrapper.get_param().dtype not in _FUSED_DTYPES:
        return False
    if not wrapper._did_swap_in_out_features and wrapper.num_experts == 1:
        return False
    reason = _unsupported(wrapper, adapters[0])
    if reason is not None:
        raise UnsupportedLoraAdapter(reason)
    return True


@contextlib.contextmanager
def _activate_lora(wrapper, active_adapters: list[str]):
    """``ParamWrapper._activate_lora`` once ``install`` ran (``wrapper`` is the ParamWrapper)."""
    module = wrapper.get_base_layer()
    adapters = [a for a in active_adapters if a in wrapper.lora_A]
    if not adapters or not _runs_fused(module) or not _runs_fused_lora(wrapper, adapters):
        with _peft_activate_lora(wrapper, active_adapters):
            yield
        return
    outer = getattr(module, _ACTIVE, None)
    # A new tuple each time, never mutated: nested wrappers (gate_up inside down) each add theirs.
    module._moe_tune_lora = (outer or ()) + ((wrapper.parameter_name, wrapper, adapters[0]),)
    try:
        yield
    finally:
        # Leave the module as found: an attribute left behind (even None) fails torch.compile's
        # guard on its absence, one recompile of the whole model on its second step.
        if outer is None:
            del module._moe_tune_lora
        else:
            module._moe_tune_lora = outer


def _instance_attribute(module: torch.nn.Module, name: str):
    """``getattr(module, name, None)`` for a plain attribute: in eager mode read from the
    instance's ``__dict__`` (nn.Module's ``__getattr__`` takes ~2 µs to miss a name)."""
    if torch.compiler.is_compiling():
        return getattr(module, name, None)
    return module.__dict__.get(name)


def _has_parametrizations(module: torch.nn.Module) -> bool:
    """``parametrize.is_parametrized(module)``: in eager mode a look-up in the module's submodules,
    where torch keeps them."""
    if torch.compiler.is_compiling():
        return parametrize.is_parametrized(module)
    return module._modules.get("parametrizations") is not None


def experts_weights(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, MoeLora | None]:
    """(gate_up_w, down_w, lora) of a transformers experts module: the frozen weights and the
    active wrappers' factors where the fused LoRA block runs PEFT's LoRA (``_activate_lora``),
    else the parameters as read — W + ΔW where PEFT's own path runs it, an unrelated
    parametrization applied as usual — and None. One weight fused and the other on PEFT's path
    raises ``UnsupportedLoraAdapter``."""
    factors = {}
    for name, wrapper, adapter in _instance_attribute(module, _ACTIVE) or ():
        factors[name] = LoraFactors.from_peft(wrapper.lora_A[adapter].weight, wrapper.lora_B[adapter].weight,
                                              wrapper.num_experts, wrapper.scaling[adapter])
    if not factors and not _has_parametrizations(module):  # the plain module: its two parameters
        return module.gate_up_proj, module.down_proj, None
    for name in _WEIGHTS:
        if not parametrize.is_parametrized(module, name):
            continue
        if any(type(p).__module__.startswith("peft.") for p in module.parametrizations[name]):
            if not factors:
                continue  # PEFT's own path for the whole module: W + ΔW, read as is
            raise UnsupportedLoraAdapter(
                f"{type(module).__name__}: the LoRA on {', '.join(sorted(factors))} runs fused but the one on {name} "
                "takes PEFT's own path (several active adapters, or weights the kernels do not take); give both "
                "expert weights the same adapters")
        if name in factors:
            raise UnsupportedLoraAdapter(
                f"{type(module).__name__}.{name} carries another parametrization under the LoRA; keep other "
                "parametrizations off LoRA-targeted expert weights")
    lora = MoeLora(gate_up=factors.get("gate_up_proj"), down=factors.get("down_proj")) if factors else None
    return module.gate_up_proj, module.down_proj, lora
