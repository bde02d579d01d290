"""Plain-torch reference of the experts block (``moe_tune.moe_experts``), one expert at a time.

Differentiable with torch's autograd, so the tests take every gradient of the block from it.
Computed in float64 by default; slow on purpose (a Python loop over experts with host reads).
"""

from __future__ import annotations

import torch


def reference_moe_experts(hidden, gate_up_w, down_w, top_k_index, top_k_weights, *, activation="silu",
                          dtype=torch.float64) -> torch.Tensor:
    """``out[t] = Σ_j w[t, j] · (silu(x_t·G_eᵀ) · x_t·U_eᵀ)·D_eᵀ`` with ``[G_e; U_e] = gate_up_w[e]``,
    ``D_e = down_w[e]``, ``e = top_k_index[t, j]``. Returns ``dtype``."""
    if activation != "silu":
        raise ValueError(f"the reference knows only silu, got {activation!r}")
    x, w1, w2, w = hidden.to(dtype), gate_up_w.to(dtype), down_w.to(dtype), top_k_weights.to(dtype)
    out = torch.zeros(x.shape, dtype=dtype, device=x.device)
    for e in range(w1.shape[0]):
        tokens, slots = torch.nonzero(top_k_index == e, as_tuple=True)
        if tokens.numel() == 0:
            continue
        gate, up = (x[tokens] @ w1[e].T).chunk(2, dim=-1)
        y = (torch.nn.functional.silu(gate) * up) @ w2[e].T
        out = out.index_add(0, tokens, y * w[tokens, slots, None])
    return out


def routing_weight_grad_scale(hidden, gate_up_w, down_w, top_k_index, grad_out) -> torch.Tensor:
    """``[T, k]``: ``Σ_i |(G_t·D_e)_i · A_i|`` per slot, in float64.

    The gradient of a routing weight is one dot product over I whose terms can cancel, so a
    relative error of the sum says little; rounding bounds its error by a few units of the
    dtype's precision times this sum of absolute terms.
    """
    x, w1, w2, g = hidden.double(), gate_up_w.double(), down_w.double(), grad_out.double()
    scale = torch.zeros(top_k_index.shape, dtype=torch.float64, device=x.device)
    for e in range(w1.shape[0]):
        tokens, slots = torch.nonzero(top_k_index == e, as_tuple=True)
        if tokens.numel() == 0:
            continue
        gate, up = (x[tokens] @ w1[e].T).chunk(2, dim=-1)
        act = torch.nn.functional.silu(gate) * up
        scale[tokens, slots] = ((g[tokens] @ w2[e]).abs() * act.abs()).sum(-1)
    return scale
