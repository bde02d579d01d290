"""Plain-torch reference of the gpt-oss experts block (``moe_tune.gptoss_experts``), one expert at a
time, written from transformers' ``GptOssExperts.forward`` and ``_apply_gate``.

Differentiable with torch's autograd (``torch.clamp``'s gradient rule included), so the tests take
every gradient of the block from it. Computed in float64 by default; slow on purpose.
"""

from __future__ import annotations

import torch


def clamped_swiglu(gate_up: torch.Tensor, limit: float, alpha: float) -> torch.Tensor:
    """``[.., 2I]`` interleaved gate/up → ``[.., I]``: ``(clamp(up, ±limit) + 1)·g·σ(alpha·g)``
    with ``g = min(gate, limit)``."""
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def reference_gptoss_experts(hidden, gate_up_w, gate_up_b, down_w, down_b, top_k_index, top_k_weights, *,
                             limit: float = 7.0, alpha: float = 1.702, dtype=torch.float64) -> torch.Tensor:
    """``out[t] = Σ_j w[t, j] · (act(x_t·W1[e] + b1[e])·W2[e] + b2[e])``, ``e = top_k_index[t, j]``,
    with ``W1 = gate_up_w [E, H, 2I]`` and ``W2 = down_w [E, I, H]`` as gpt-oss stores them.
    Returns ``dtype``."""
    x, w1, b1, w2, b2, w = (t.to(dtype) for t in (hidden, gate_up_w, gate_up_b, down_w, down_b, top_k_weights))
    out = torch.zeros(x.shape, dtype=dtype, device=x.device)
    for e in range(w1.shape[0]):
        tokens, slots = torch.nonzero(top_k_index == e, as_tuple=True)
        if tokens.numel() == 0:
            continue
        act = clamped_swiglu(x[tokens] @ w1[e] + b1[e], limit, alpha)
        y = act @ w2[e] + b2[e]
        out = out.index_add(0, tokens, y * w[tokens, slots, None])
    return out


def routing_weight_grad_scale(hidden, gate_up_w, gate_up_b, down_w, down_b, top_k_index, grad_out, *,
                              limit: float = 7.0, alpha: float = 1.702) -> torch.Tensor:
    """``[T, k]``: ``Σ_i |(G_t·W2[e]ᵀ)_i · A_i| + Σ_h |G_t,h · b2[e]_h|`` per slot, float64: the sum of
    the magnitudes of the terms of a routing weight's gradient, which can cancel. Rounding bounds
    its error by a few units of the dtype's precision times this."""
    x, w1, b1, w2, b2, g = (t.double() for t in (hidden, gate_up_w, gate_up_b, down_w, down_b, grad_out))
    scale = torch.zeros(top_k_index.shape, dtype=torch.float64, device=x.device)
    for e in range(w1.shape[0]):
        tokens, slots = torch.nonzero(top_k_index == e, as_tuple=True)
        if tokens.numel() == 0:
            continue
        act = clamped_swiglu(x[tokens] @ w1[e] + b1[e], limit, alpha)
        scale[tokens, slots] = ((g[tokens] @ w2[e].T).abs() * act.abs()).sum(-1) + (g[tokens].abs() * b2[e].abs()).sum(-1)
    return scale
