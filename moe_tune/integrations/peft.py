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
get an eager delta before the experts run.

``install`` replaces ``ParamWrapper._activate_lora`` with a version that, for an experts module
whose ``config._experts_implementation`` is one registered by moe-tune and whose weights are
stored ``[E, N, K]`` (the Qwen3-MoE family; gpt-oss's ``[E, K, N]`` keeps PEFT's path), registers ``LazyLoraDelta`` instead: an unchecked parametrization holding the wrapper's factors
and building nothing. moe-tune's ``experts_forward`` then reads the frozen weight from
``module.parametrizations.<name>.original`` and the factors from ``LazyLoraDelta``
(``experts_weights``) and runs ``moe_tune.moe_experts(..., lora=...)``. Anything else that reads
the parameter gets PEFT's own W + ΔW (``LazyLoraDelta.forward``). Every other experts
implementation keeps PEFT's original code path, untouched.

The adapter's parameters stay PEFT's (the factors are views of ``lora_A``/``lora_B`` weights), so
saving and loading adapters is PEFT's business as before. What the fused path cannot compute
raises ``UnsupportedLoraAdapter`` before the experts run: several active adapters, DoRA or other
LoRA variants, LoRA dropout, a LoRA bias. A merged or disabled adapter
never activates: the experts run on the (merged) base weights, as in PEFT.

Importing this module imports neither peft nor transformers; ``install`` imports peft.
"""

from __future__ import annotations

import contextlib
import weakref

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


class LazyLoraDelta(torch.nn.Module):
    """The parametrization ``install`` registers instead of PEFT's: it keeps the LoRA factors of
    one ``ParamWrapper`` adapter and builds W + ΔW only if something reads the parameter."""

    def __init__(self, wrapper: torch.nn.Module, adapter: str):
        super().__init__()
        # A weak reference, not a submodule: the wrapper owns the experts module this
        # parametrization lives on, so a strong one would put the wrapper inside its own state.
        self._wrapper = weakref.ref(wrapper)
        self.adapter = adapter

    def factors(self) -> LoraFactors:
        wrapper = self._wrapper()
        return LoraFactors.from_peft(wrapper.lora_A[self.adapter].weight, wrapper.lora_B[self.adapter].weight,
                                     wrapper.num_experts, wrapper.scaling[self.adapter])

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        # PEFT's single-adapter fold (_LoraFactorsProxy), in the weight's dtype with autocast off.
        lhs, rhs, scaling = self._wrapper().get_delta_factors(self.adapter)
        with torch.autocast(device_type=weight.device.type, enabled=False):
            return torch.baddbmm(weight, lhs, rhs, alpha=scaling)


def _runs_fused(module: torch.nn.Module) -> bool:
    implementation = getattr(getattr(module, "config", None), "_experts_implementation", None)
    return implementation in _FUSED_IMPLEMENTATIONS


def _check_supported(wrapper, adapters: list[str]) -> None:
    where = f"LoRA on {type(wrapper.get_base_layer()).__name__}.{wrapper.parameter_name}"
    if len(adapters) > 1:
        raise UnsupportedLoraAdapter(
            f"{where}: experts_implementation='moe_tune' runs one active adapter, got {len(adapters)} "
            f"({', '.join(adapters)}); activate one (model.set_adapter(name)) or merge the others first")
    adapter = adapters[0]
    if wrapper.use_dora.get(adapter) or adapter in getattr(wrapper, "lora_variant", {}):
        raise UnsupportedLoraAdapter(f"{where}: DoRA and other LoRA variants are not supported by the fused path")
    dropout = wrapper.lora_dropout[adapter]
    if not isinstance(dropout, torch.nn.Identity) and getattr(dropout, "p", 1.0) != 0:
        raise UnsupportedLoraAdapter(f"{where}: LoRA dropout must be 0 (dropout acts on x before A, which the fused "
                                     "path never materialises per expert)")
    if wrapper.lora_bias.get(adapter):
        raise UnsupportedLoraAdapter(f"{where}: a LoRA bias (lora_bias=True) is not supported")


@contextlib.contextmanager
def _activate_lora(wrapper, active_adapters: list[str]):
    """``ParamWrapper._activate_lora`` once ``install`` ran (``wrapper`` is the ParamWrapper)."""
    module = wrapper.get_base_layer()
    adapters = [a for a in active_adapters if a in wrapper.lora_A]
    # A weight stored [E, K, N] (gpt-oss) keeps PEFT's W + ΔW: the fused LoRA block is the [E, N, K] one.
    if not adapters or not _runs_fused(module) or not wrapper._did_swap_in_out_features:
        with _peft_activate_lora(wrapper, active_adapters):
            yield
        return
    _check_supported(wrapper, adapters)
    name = wrapper.parameter_name
    stored = module.parametrizations[name].original if parametrize.is_parametrized(module, name) else getattr(module, name)
    requires_grad = stored.requires_grad
    # unsafe: torch would otherwise evaluate the parametrization (build W + ΔW) to check it.
    parametrize.register_parametrization(module, name, LazyLoraDelta(wrapper, adapters[0]), unsafe=True)
    module.parametrizations[name].original.requires_grad_(requires_grad)
    try:
        with parametrize.cached():
            yield
    finally:
        _remove(module, name)


def _remove(module: torch.nn.Module, name: str) -> None:
    plist = module.parametrizations[name]
    if len(plist) == 1:
        parametrize.remove_parametrizations(module, name, leave_parametrized=False)
        return
    # Another parametrization sits below ours: drop only ours (the last one registered).
    for i in reversed(range(len(plist))):
        if isinstance(plist[i], LazyLoraDelta):
            del plist[i]
            return


def experts_weights(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, MoeLora | None]:
    """(gate_up_w, down_w, lora) of a transformers experts module: the frozen weights and
    ``LazyLoraDelta``'s factors where PEFT's LoRA is active, else the parameters as read (an
    unrelated parametrization applies as usual) and None."""
    weights, factors = [], {}
    for name in _WEIGHTS:
        plist = module.parametrizations[name] if parametrize.is_parametrized(module, name) else ()
        lazy = [p for p in plist if isinstance(p, LazyLoraDelta)]
        if lazy and len(plist) == 1:
            weights.append(plist.original)
            factors[name] = lazy[0].factors()
            continue
        if lazy or any(type(p).__module__.startswith("peft.") for p in plist):
            raise UnsupportedLoraAdapter(
                f"{type(module).__name__}.{name} carries PEFT's own LoRA parametrization (W + ΔW built every "
                "forward) or another parametrization under the LoRA; call "
                "moe_tune.integrations.transformers.register() before the model runs, and keep other "
                "parametrizations off LoRA-targeted expert weights")
        weights.append(getattr(module, name))
    lora = MoeLora(gate_up=factors.get("gate_up_proj"), down=factors.get("down_proj")) if factors else None
    return weights[0], weights[1], lora
