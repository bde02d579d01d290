"""LoRA on the experts block: ``moe_tune.moe_experts(..., lora=MoeLora(...))``.

Per expert e, for the gate_up and the down weight W [E, N, K]:
``y = x·W[e]ᵀ + scaling·(x·A[e]ᵀ)·B[e]ᵀ`` with W frozen, i.e. ΔW[e] = scaling·B[e]·A[e], exactly
what PEFT's ``ParamWrapper`` (``LoraConfig(target_parameters=[...])``) computes for a 3-D expert
parameter. The factor layouts are PEFT's, per expert:

* ``lora_A`` ``[E, r, K]`` — PEFT's ``lora_A.weight`` ``[E·r, K]`` viewed per expert
  (``.view(E, r, K)``, rows expert-major);
* ``lora_B`` ``[E, N, r]`` — PEFT's ``lora_B.weight`` ``[N, r·E]`` viewed per expert
  (``.view(N, r, E).permute(2, 0, 1)``: PEFT interleaves the experts rank-major in B's columns).

``LoraFactors.from_peft`` builds those views, so the gradients land on PEFT's own parameters.
Any strides and any floating dtype are accepted: the factors are cast to the weights' dtype (as
PEFT does) and made contiguous, with the scaling folded into B (a copy of E·N·r elements, which
autograd differentiates like any tensor op); the block itself (``moe_tune.ops.lora_block``, where
the data flow is) never sees the scaling.

Eager calls run a ``torch.autograd.Function`` that launches the kernels directly; under
torch.compile the block is the ``moe_tune::moe_experts_lora_fwd``/``_bwd`` op pair
(``moe_tune.ops.lora_ops``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moe_tune.errors import InvalidInputError
from moe_tune.ops import lora_block, lora_ops


def _fail(message: str) -> None:
    raise InvalidInputError(message)


@dataclass(frozen=True)
class LoraFactors:
    """The LoRA of one expert weight W [E, N, K]: ΔW[e] = scaling·lora_B[e]·lora_A[e]."""

    lora_A: torch.Tensor  # (E, r, K)
    lora_B: torch.Tensor  # (E, N, r)
    scaling: float

    @classmethod
    def from_peft(cls, lora_A_weight: torch.Tensor, lora_B_weight: torch.Tensor, num_experts: int,
                  scaling: float) -> "LoraFactors":
        """Views of PEFT's ``ParamWrapper`` weights for a 3-D parameter stored ``[E, N, K]``:
        ``lora_A.weight`` ``[E·r, K]`` and ``lora_B.weight`` ``[N, r·E]`` (PEFT's
        ``get_delta_factors``, without its cast)."""
        if lora_A_weight.dim() != 2 or lora_B_weight.dim() != 2 or lora_A_weight.shape[0] % num_experts:
            _fail(f"PEFT's lora_A.weight must be [E·r, K] and lora_B.weight [N, r·E] with E={num_experts}, got "
                  f"{list(lora_A_weight.shape)} and {list(lora_B_weight.shape)}")
        rank = lora_A_weight.shape[0] // num_experts
        if lora_B_weight.shape[1] != rank * num_experts:
            _fail(f"PEFT's lora_B.weight must be [N, r·E] = [N, {rank * num_experts}], got {list(lora_B_weight.shape)}")
        lora_A = lora_A_weight.view(num_experts, rank, lora_A_weight.shape[1])
        lora_B = lora_B_weight.view(lora_B_weight.shape[0], rank, num_experts).permute(2, 0, 1)
        return cls(lora_A, lora_B, scaling)

    @property
    def rank(self) -> int:
        return int(self.lora_A.shape[1])

    def delta_weight(self) -> torch.Tensor:
        """ΔW [E, N, K] (for references and tests: the block never builds it)."""
        return self.scaling * torch.bmm(self.lora_B, self.lora_A)


@dataclass(frozen=True)
class MoeLora:
    """LoRA on the experts: ``gate_up`` on gate_up_w ([E, 2I, H]; gpt-oss's [E, H, 2I]), ``down`` on
    down_w ([E, H, I]; gpt-oss's [E, I, H]); either may be None (that weight runs without LoRA).
    The factors' per-expert shapes are the same in both layouts (``LoraFactors``). LoRA dropout is not supported: dropout
    acts on x before A, which the fused path cannot factor out (PEFT refuses it on expert
    parameters for the same reason)."""

    gate_up: LoraFactors | None = None
    down: LoraFactors | None = None


def _check_factors(name: str, factors, weight: torch.Tensor, hidden: torch.Tensor, kn: bool) -> None:
    if factors is None:
        return
    if not isinstance(factors, LoraFactors):
        _fail(f"lora.{name} must be a moe_tune.ops.lora.LoraFactors or None, got {type(factors).__name__}")
    E, N, K = (weight.shape[0], weight.shape[2], weight.shape[1]) if kn else weight.shape
    a, b = factors.lora_A, factors.lora_B
    for part, t in (("lora_A", a), ("lora_B", b)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            _fail(f"lora.{name}.{part} must be a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if t.device != hidden.device:
            _fail(f"lora.{name}.{part} is on {t.device} but hidden is on {hidden.device}")
    if a.dim() != 3 or a.shape[0] != E or a.shape[2] != K or a.shape[1] < 1:
        _fail(f"lora.{name}.lora_A must be [E, r, K] = [{E}, r, {K}], got {list(a.shape)}")
    if tuple(b.shape) != (E, N, a.shape[1]):
        _fail(f"lora.{name}.lora_B must be [E, N, r] = {[E, N, int(a.shape[1])]}, got {list(b.shape)}")
    scaling = factors.scaling
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        _fail(f"lora.{name}.scaling must be a finite number, got {scaling!r}")
    # Dynamo may trace the scaling as a symbolic float, which math.isfinite cannot read.
    if not torch.compiler.is_compiling() and not math.isfinite(scaling):
        _fail(f"lora.{name}.scaling must be a finite number, got {scaling!r}")


def check_lora(lora, gate_up_w: torch.Tensor, down_w: torch.Tensor, hidden: torch.Tensor, *, kn: bool = False) -> None:
    """``InvalidInputError`` unless ``lora`` fits the block's weights (the weights are already
    checked by the block's function). ``kn``: the weights are stored [E, K, N] (gpt-oss); the
    factors are per expert A [r, K] and B [N, r] either way."""
    if not isinstance(lora, MoeLora):
        _fail(f"lora must be a moe_tune.ops.lora.MoeLora, got {type(lora).__name__}")
    if lora.gate_up is None and lora.down is None:
        _fail("lora must carry LoRA factors for gate_up, down or both")
    _check_factors("gate_up", lora.gate_up, gate_up_w, hidden, kn)
    _check_factors("down", lora.down, down_w, hidden, kn)
    if torch.is_grad_enabled() and (gate_up_w.requires_grad or down_w.requires_grad):
        _fail("with lora, the base weights are frozen and get no gradient: call requires_grad_(False) on "
              "gate_up_w and down_w (or train them without lora)")


def _contiguous(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # On a 3-D tensor whose dtype already matches, ``Tensor.to`` returns ``t`` itself whatever
    # memory_format says. PEFT's lora_B view is permuted (strides (1, r·E, E)) and s·B keeps those
    # strides, while the kernels' TMA descriptors take the innermost stride as 1: factors in the
    # weights' dtype (an fp32 model; bf16 ones from inject_adapter_in_model) read B in the wrong
    # order, 0.2 relative error in out on an H200 (bench_lora).
    return t.to(dtype, memory_format=torch.contiguous_format).contiguous()


def prepared(factors: LoraFactors | None, dtype: torch.dtype):
    """(A, s·B), contiguous in the weights' dtype; (None, None) without LoRA."""
    if factors is None:
        return None, None
    return _contiguous(factors.lora_A, dtype), _contiguous(factors.lora_B * factors.scaling, dtype)


def moe_experts_lora(hidden, gate_up_w, down_w, top_k_index, top_k_weights, lora: MoeLora) -> torch.Tensor:
    """The block with LoRA; ``moe_tune.moe_experts(..., lora=lora)`` calls it after checking the
    block's own tensors (contiguous by then)."""
    check_lora(lora, gate_up_w, down_w, hidden)
    up_a, up_b = prepared(lora.gate_up, gate_up_w.dtype)
    down_a, down_b = prepared(lora.down, gate_up_w.dtype)
    args = (hidden, gate_up_w, down_w, top_k_index, top_k_weights, up_a, up_b, down_a, down_b)
    if torch.compiler.is_compiling():
        return lora_ops.moe_experts_lora_fwd(*args)[0]
    return _EagerLora.apply(*args)


class _EagerLora(torch.autograd.Function):
    """The LoRA block outside torch.compile: bodies run as plain Python, kernels launched directly."""

    @staticmethod
    def forward(ctx, hidden, gate_up_w, down_w, top_k_index, top_k_weights, up_a, up_b, down_a, down_b):
        out, h, l1, l2, offsets, slots = lora_block.forward(hidden, gate_up_w, down_w, top_k_index, top_k_weights,
                                                            up_a, up_b, down_a, down_b, in_op=False)
        # X is read again only by dA1.
        ctx.save_for_backward(hidden if up_a is not None else None, gate_up_w, down_w, top_k_weights, h, l1, l2,
                              offsets, slots, up_a, up_b, down_a, down_b)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, gate_up_w, down_w, top_k_weights, h, l1, l2, offsets, slots, up_a, up_b, down_a, down_b = \
            ctx.saved_tensors
        need_hidden, _, _, _, need_weights, need_up_a, need_up_b, need_down_a, need_down_b = ctx.needs_input_grad
        d_hidden, d_up_a, d_up_b, d_down_a, d_down_b, d_weights = lora_block.backward(
            grad_out, hidden, gate_up_w, down_w, top_k_weights, h, l1, l2, offsets, slots, up_a, up_b, down_a,
            down_b, need_hidden=need_hidden, need_up_a=need_up_a, need_up_b=need_up_b, need_down_a=need_down_a,
            need_down_b=need_down_b, in_op=False)
        return (d_hidden if need_hidden else None, None, None, None, d_weights if need_weights else None,
                d_up_a if need_up_a else None, d_up_b if need_up_b else None,
                d_down_a if need_down_a else None, d_down_b if need_down_b else None)
