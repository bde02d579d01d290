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
traces the whole forward (no graph break). moe-tune's ``experts_forward`` then reads

* weights stored ``[E, N, K]`` (the Qwen3-MoE family): the frozen weights and those wrappers'
  factors (``experts_weights``), and runs ``moe_tune.moe_experts(..., lora=...)``; W + ΔW is never
  built;
* weights stored ``[E, K, N]`` (gpt-oss): W + ΔW folded as PEFT folds it, one ``baddbmm`` per
  weight (``folded_weights``), into moe-tune's gpt-oss block; the fused LoRA block is the
  ``[E, N, K]`` one. Several adapters or float8 weights keep PEFT's own path there.
 What that trades: code other than the
experts forward that reads ``module.gate_up_proj`` inside the wrapper's forward (a hook, say) sees
the frozen weight, not PEFT's W + ΔW. Every other experts implementation keeps PEFT's original
code path, untouched.

The adapter's parameters stay PEFT's (the factors are views of ``lora_A``/``lora_B`` weights), so
saving and loading adapters is PEFT's business as before. What the fused path cannot compute
raises ``UnsupportedLoraAdapter`` before the experts run: several active adapters, DoRA or other
LoRA variants, LoRA dropout, a LoRA bias, another parametrization on a LoRA-targeted weight. A
merged or disabled adapter never activates: the experts run on the (merged) base weights, as in
PEFT.

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

# Weight dtypes PEFT folds one adapter into with a baddbmm (float8 types take its eager delta).
_FOLD_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _runs_fused(module: torch.nn.Module) -> bool:
    implementation = getattr(getattr(module, "config", None), "_experts_implementation", None)
    return implementation in _FUSED_IMPLEMENTATIONS


def _unsupported(wrapper, adapters: list[str]) -> str | None:
    """Why moe-tune cannot run these active adapters of ``wrapper`` (None: it can)."""
    where = f"LoRA on {type(wrapper.get_base_layer()).__name__}.{wrapper.parameter_name}"
    if len(adapters) > 1:
        return (f"{where}: experts_implementation='moe_tune' runs one active adapter, got {len(adapters)} "
                f"({', '.join(adapters)}); activate one (model.set_adapter(name)) or merge the others first")
    adapter = adapters[0]
    if wrapper.use_dora.get(adapter) or adapter in getattr(wrapper, "lora_variant", {}):
        return f"{where}: DoRA and other LoRA variants are not supported by the fused path"
    dropout = wrapper.lora_dropout[adapter]
    if not isinstance(dropout, torch.nn.Identity) and getattr(dropout, "p", 1.0) != 0:
        return (f"{where}: LoRA dropout must be 0 (dropout acts on x before A, which the fused path never "
                "materialises per expert)")
    if wrapper.lora_bias.get(adapter):
        return f"{where}: a LoRA bias (lora_bias=True) is not supported"
    return None


def _foldable(wrapper, adapters: list[str]) -> bool:
    """Whether ``folded_weights`` computes what PEFT would for an ``[E, K, N]`` weight: a plain
    adapter (``_unsupported`` finds nothing) that PEFT itself folds (``_LoraFactorsProxy``: one
    adapter, weights not of a float8 type)."""
    return (_unsupported(wrapper, adapters) is None and wrapper.num_experts > 1
            and wrapper.get_param().dtype in _FOLD_DTYPES)


@contextlib.contextmanager
def _activate_lora(wrapper, active_adapters: list[str]):
    """``ParamWrapper._activate_lora`` once ``install`` ran (``wrapper`` is the ParamWrapper)."""
    module = wrapper.get_base_layer()
    adapters = [a for a in active_adapters if a in wrapper.lora_A]
    if not adapters or not _runs_fused(module):
        with _peft_activate_lora(wrapper, active_adapters):
            yield
        return
    if wrapper._did_swap_in_out_features:
        reason = _unsupported(wrapper, adapters)
        if reason is not None:
            raise UnsupportedLoraAdapter(reason)
    elif not _foldable(wrapper, adapters):
        with _peft_activate_lora(wrapper, active_adapters):
            yield
        return
    outer = getattr(module, _ACTIVE, None)
    # A new tuple each time, never mutated: nested wrappers (gate_up inside down) each add theirs.
    module._moe_tune_lora = (outer or ()) + ((wrapper.parameter_name, wrapper, adapters[0]),)
    try:
        yield
    finally:
        module._moe_tune_lora = outer


def experts_weights(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, MoeLora | None]:
    """(gate_up_w, down_w, lora) of a transformers experts module: the frozen weights and the
    active wrappers' factors where PEFT's LoRA is active (``_activate_lora``), else the
    parameters as read (an unrelated parametrization applies as usual) and None."""
    factors = {}
    for name, wrapper, adapter in getattr(module, _ACTIVE, None) or ():
        factors[name] = LoraFactors.from_peft(wrapper.lora_A[adapter].weight, wrapper.lora_B[adapter].weight,
                                              wrapper.num_experts, wrapper.scaling[adapter])
    for name in _WEIGHTS:
        if not parametrize.is_parametrized(module, name):
            continue
        plist = module.parametrizations[name]
        if name in factors or any(type(p).__module__.startswith("peft.") for p in plist):
            raise UnsupportedLoraAdapter(
                f"{type(module).__name__}.{name} carries PEFT's own LoRA parametrization (W + ΔW built every "
                "forward) or another parametrization under the LoRA; call "
                "moe_tune.integrations.transformers.register() before the model runs, and keep other "
                "parametrizations off LoRA-targeted expert weights")
    lora = MoeLora(gate_up=factors.get("gate_up_proj"), down=factors.get("down_proj")) if factors else None
    return module.gate_up_proj, module.down_proj, lora


def folded_weights(module: torch.nn.Module, names: tuple[str, ...]) -> list[torch.Tensor]:
    """The ``names`` weights of an experts module as PEFT's active LoRA makes them: W + s·lhs·rhs
    in W's dtype (PEFT's one-adapter fold, autocast off) where ``_activate_lora`` marked one
    active, else the parameter as read."""
    active = {name: (wrapper, adapter) for name, wrapper, adapter in getattr(module, _ACTIVE, None) or ()}
    weights = []
    for name in names:
        weight = getattr(module, name)
        if name in active:
            wrapper, adapter = active[name]
            lhs, rhs, scaling = wrapper.get_delta_factors(adapter)
            with torch.autocast(device_type=weight.device.type, enabled=False):
                weight = torch.baddbmm(weight, lhs, rhs, alpha=scaling)
        weights.append(weight)
    return weights
