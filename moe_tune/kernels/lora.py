"""Elementwise Triton kernels of the experts block with LoRA (``moe_tune.ops.lora_block``).

With LoRA on the gate_up weight, the up projection's output is H = X·W1ᵀ + (X·A1ᵀ)·B1ᵀ: the base
GEMM and the LoRA GEMM write their parts separately, and SwiGLU must see their sum. With LoRA on
the down weight, SwiGLU's backward must see dA = w·(G·W2) + w·(G·B2)·A2, and the routing-weight
gradient gains the LoRA term ⟨G·B2, L2⟩. The grouped-GEMM kernels' epilogues take neither extra
input, so these two kernels do that work between the GEMMs:

* ``swiglu_add_kernel`` — H += ΔH in place, A = silu(H_gate)·H_up;
* ``swiglu_bwd_kernel`` — dH of dA = w·dA_raw + dA_lora, w·A (the down dW's operand, written over
  dA_raw) and the routing-weight gradient per token slot.

Rows are the M = T·k routed rows in expert order; both kernels compute in float32.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def swiglu_add_kernel(
    # Pointers --------------------------------------------------------------------------------
    h_ptr,  # (M, 2I): gate | up of the base GEMM in, of base + LoRA out
    dh_ptr,  # (M, 2I): the LoRA GEMM's gate | up
    act_ptr,  # (M, I): silu(gate)·up out
    # Sizes -------------------------------------------------------------------------------------
    num_rows,  # M
    inter,  # I
    # Strides -----------------------------------------------------------------------------------
    stride_h_m, stride_dh_m, stride_act_m,
    # Meta-parameters ---------------------------------------------------------------------------
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Grid: (⌈M / BLOCK_M⌉, ⌈I / BLOCK_N⌉). A program owns the same BLOCK_N columns of the gate
    and the up half, so it reads each element of H and ΔH once."""
    dtype = h_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < num_rows)[:, None] & (cols < inter)[None, :]
    # int64: M·2I passes 2^31 on the largest models at 32k tokens.
    rows64 = rows.to(tl.int64)[:, None]
    h_ptrs = h_ptr + rows64 * stride_h_m + cols[None, :]
    dh_ptrs = dh_ptr + rows64 * stride_dh_m + cols[None, :]

    gate = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32) + tl.load(dh_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = (tl.load(h_ptrs + inter, mask=mask, other=0.0).to(tl.float32)
          + tl.load(dh_ptrs + inter, mask=mask, other=0.0).to(tl.float32))
    tl.store(h_ptrs, gate.to(dtype), mask=mask)
    tl.store(h_ptrs + inter, up.to(dtype), mask=mask)
    act = gate * tl.sigmoid(gate) * up
    tl.store(act_ptr + rows64 * stride_act_m + cols[None, :], act.to(dtype), mask=mask)


@triton.jit
def swiglu_bwd_kernel(
    # Pointers --------------------------------------------------------------------------------
    d_act_ptr,  # (M, I): dA_raw = G[slot // k]·W2[e] in (unweighted); w·silu(gate)·up out
    d_act_lora_ptr,  # (M, I): the LoRA part of dA, routing weight applied: w·(G·B2[e])·A2[e]
    h_ptr,  # (M, 2I): gate | up of the forward (base + LoRA)
    dh_ptr,  # (M, 2I): d gate | d up out
    weights_ptr,  # (M,) routing weight per token slot
    sorted_slots_ptr,  # (M,) int32: token-slot id of each expert-ordered row
    p_ptr,  # (M, R): P = G·B2[e], unweighted
    l_ptr,  # (M, R): L2 = A·A2[e]ᵀ of the forward
    d_weights_ptr,  # (M,) float32 per token slot: ⟨dA_raw, A⟩ + ⟨P, L2⟩ out
    # Sizes -------------------------------------------------------------------------------------
    num_rows,  # M
    inter,  # I
    rank,  # R
    # Strides -----------------------------------------------------------------------------------
    stride_d_act_m, stride_d_act_lora_m, stride_h_m, stride_dh_m, stride_p_m, stride_l_m,
    # Meta-parameters ---------------------------------------------------------------------------
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Grid: (⌈M / BLOCK_M⌉,). A program walks all I columns of its rows, so the routing-weight
    gradient of a slot is one sum in registers, stored once (no partials, no atomics)."""
    dtype = h_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < num_rows
    rows = tl.where(row_mask, rows, 0)
    slots = tl.load(sorted_slots_ptr + rows, mask=row_mask, other=0)
    w_row = tl.load(weights_ptr + slots, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    rows64 = rows.to(tl.int64)[:, None]

    # -- SwiGLU backward over the I columns, base and LoRA parts of dA summed first ---------------
    d_weight = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(0, inter, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        mask = row_mask[:, None] & (cols < inter)[None, :]
        d_act_ptrs = d_act_ptr + rows64 * stride_d_act_m + cols[None, :]
        h_ptrs = h_ptr + rows64 * stride_h_m + cols[None, :]
        d_raw = tl.load(d_act_ptrs, mask=mask, other=0.0).to(tl.float32)
        d_lora = tl.load(d_act_lora_ptr + rows64 * stride_d_act_lora_m + cols[None, :], mask=mask,
                         other=0.0).to(tl.float32)
        gate = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(h_ptrs + inter, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        silu = gate * sig
        act = silu * up
        d_weight += tl.sum(d_raw * act, axis=1)
        d_act = d_raw * w_row + d_lora
        dh_ptrs = dh_ptr + rows64 * stride_dh_m + cols[None, :]
        tl.store(dh_ptrs, (d_act * up * sig * (1.0 + gate * (1.0 - sig))).to(dtype), mask=mask)
        tl.store(dh_ptrs + inter, (d_act * silu).to(dtype), mask=mask)
        # Each element is read above before this program overwrites it: dA_raw's buffer is reused.
        tl.store(d_act_ptrs, (act * w_row).to(dtype), mask=mask)

    # -- The LoRA term of the routing-weight gradient: ⟨G, L2·B2ᵀ⟩ = ⟨G·B2, L2⟩ -------------------
    for r0 in range(0, rank, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        mask = row_mask[:, None] & (rs < rank)[None, :]
        p = tl.load(p_ptr + rows64 * stride_p_m + rs[None, :], mask=mask, other=0.0).to(tl.float32)
        lo = tl.load(l_ptr + rows64 * stride_l_m + rs[None, :], mask=mask, other=0.0).to(tl.float32)
        d_weight += tl.sum(p * lo, axis=1)
    tl.store(d_weights_ptr + slots, d_weight, mask=row_mask)
