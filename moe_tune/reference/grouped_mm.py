"""Plain-torch references of the three grouped-GEMM passes, one expert at a time.

Same arguments and layouts as the launchers in ``moe_tune.ops.grouped_gemm`` (see there), computed
in float64 by default so a kernel's error is measured against something exact. Slow on purpose:
a Python loop over experts with host reads of the offsets.
"""

from __future__ import annotations

import torch

from moe_tune.ops.routing import Routing


def _rows(routing: Routing):
    offs = routing.expert_offsets.tolist()
    slots = routing.sorted_slots.long()
    for e in range(len(offs) - 1):
        yield e, slots[offs[e]:offs[e + 1]], torch.arange(offs[e], offs[e + 1], device=slots.device)


def reference_forward(x, w, routing: Routing, *, gather=False, scatter=False, weights=None,
                      dtype=torch.float64) -> torch.Tensor:
    """Y[rows of e] = X[rows of e] · W[e]ᵀ (· routing weight); layout as the kernel's output."""
    x, w = x.to(dtype), w.to(dtype)
    y = torch.zeros(routing.num_rows, w.shape[1], dtype=dtype, device=x.device)
    for e, slots, rows in _rows(routing):
        a = x[slots // routing.topk] if gather else x[rows]
        out = a @ w[e].T
        if weights is not None:
            out = out * weights.to(dtype)[slots, None]
        y[slots if scatter else rows] = out
    return y


def reference_dx(dy, w, routing: Routing, *, gather=False, scatter=False, weights=None,
                 dtype=torch.float64) -> torch.Tensor:
    """Gradient of ``reference_forward`` with respect to X, in X's layout (token order summed
    over the k slots when the forward gathered)."""
    dy, w = dy.to(dtype), w.to(dtype)
    d_rows = torch.zeros(routing.num_rows, w.shape[2], dtype=dtype, device=dy.device)
    for e, slots, rows in _rows(routing):
        g = dy[slots] if scatter else dy[rows]
        out = g @ w[e]
        if weights is not None:
            out = out * weights.to(dtype)[slots, None]
        d_rows[slots if gather else rows] = out
    if gather:
        return d_rows.view(routing.num_tokens, routing.topk, -1).sum(1)
    return d_rows


def reference_dw(dy, x, routing: Routing, *, gather=False, scatter=False, weights=None,
                 dtype=torch.float64) -> torch.Tensor:
    """Gradient of ``reference_forward`` with respect to W: dW[e] = dY_eᵀ · X_e."""
    dy, x = dy.to(dtype), x.to(dtype)
    num_experts = routing.num_experts
    dw = torch.zeros(num_experts, dy.shape[1], x.shape[1], dtype=dtype, device=dy.device)
    for e, slots, rows in _rows(routing):
        g = dy[slots] if scatter else dy[rows]
        if weights is not None:
            g = g * weights.to(dtype)[slots, None]
        a = x[slots // routing.topk] if gather else x[rows]
        dw[e] = g.T @ a
    return dw


# Elements converted to float64 at a time: a float64 copy of a whole dW of gpt-oss-120b is 16 GiB,
# which ran the sweep's timing worker out of memory (H200, 2026-11-27); 2^24 of them are 128 MiB.
RELATIVE_ERROR_CHUNK = 1 << 24


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN anywhere in ``out`` gives inf (never passes). Sums of
    squares accumulate on the device, ``RELATIVE_ERROR_CHUNK`` elements at a time."""
    if out.shape != ref.shape:
        raise ValueError(f"relative_error: shapes differ, {list(out.shape)} vs {list(ref.shape)}")
    out_flat, ref_flat = out.reshape(-1), ref.reshape(-1)
    diff_sq = torch.zeros((), dtype=torch.float64, device=out.device)
    ref_sq = torch.zeros((), dtype=torch.float64, device=out.device)
    finite = torch.ones((), dtype=torch.bool, device=out.device)
    for start in range(0, out_flat.numel(), RELATIVE_ERROR_CHUNK):
        o = out_flat[start:start + RELATIVE_ERROR_CHUNK].double()
        r = ref_flat[start:start + RELATIVE_ERROR_CHUNK].to(o.device, torch.float64)
        finite &= torch.isfinite(o).all()
        diff_sq += (o - r).square().sum()
        ref_sq += r.square().sum()
    if not finite.item():
        return float("inf")
    denom, diff = ref_sq.sqrt().item(), diff_sq.sqrt().item()
    return diff / denom if denom > 0 else diff
