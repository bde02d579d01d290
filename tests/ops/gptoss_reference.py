"""The float64 reference of the gpt-oss block with ``x·W1`` rounded to the kernels' dtype, for the
gradient checks of ``test_gptoss.py`` and ``test_gptoss_gpu.py``.

Why the gradients need it: the kernels store H = x·W1 in the activations' dtype (one rounding of the
float32 accumulator) and clamp H + b1 at ±limit. The clamps' derivative is a step, so a
pre-activation within one rounding of a limit can land on the other side of it: that element's
gradient is then all (d_a·g·σ, among the largest values of dH) or nothing, not a rounding error.
With the released limit of 7 and pre-activations of std ~5, 1.5-3 elements in 10⁴ cross a given
limit in bf16 (0.2-0.5 in fp16), and they move d hidden, d gate_up_w and d gate_up_b by 2-3%: a
float64 emulation of the kernels' roundings (T=512, H=256, I=128, E=8, k=2, three seeds) gives
0.019-0.033 in bf16 and 0.005-0.010 in fp16 against the exact reference, 0.0037 and 0.0005 with
the clamps decided on the exact values. The forward is continuous across the clamps and matches
the exact reference to rounding.

So the gradients are taken from this reference: the same float64 arithmetic as
``moe_tune.reference.gptoss``, but the clamps see ``round(x·W1) + b1`` as the kernels do
(straight-through: the rounding moves the value, the derivative stays x·W1's). Every other
rounding must still fit the dtype's tolerance.
"""

from __future__ import annotations

import torch

from moe_tune.reference.gptoss import clamped_swiglu


def reference_rounded_h(hidden, gate_up_w, gate_up_b, down_w, down_b, top_k_index, top_k_weights, *,
                        limit: float, alpha: float, h_dtype: torch.dtype) -> torch.Tensor:
    """``moe_tune.reference.gptoss.reference_gptoss_experts`` in float64 with ``x·W1`` rounded to
    ``h_dtype`` before the bias and the clamps. Differentiable; float64 inputs keep their graph."""
    x, w1, b1, w2, b2, w = (t.to(torch.float64) for t in
                            (hidden, gate_up_w, gate_up_b, down_w, down_b, top_k_weights))
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for e in range(w1.shape[0]):
        tokens, slots = torch.nonzero(top_k_index == e, as_tuple=True)
        if tokens.numel() == 0:
            continue
        h = x[tokens] @ w1[e]
        h = h + (h.to(h_dtype).to(torch.float64) - h).detach()
        y = clamped_swiglu(h + b1[e], limit, alpha) @ w2[e] + b2[e]
        out = out.index_add(0, tokens, y * w[tokens, slots, None])
    return out
