"""Triton SwiGLU kernels of the experts block: ``A = silu(gate)·up`` and its backward, between the
grouped GEMMs.

The up GEMM writes ``H [M, 2I]`` per routed row in expert order, gate in columns ``[0, I)`` and up
in ``[I, 2I)`` (transformers v5's concatenated gate_up layout). Both kernels compute in float32.

* ``swiglu_forward_kernel`` — ``A [M, I] = silu(H_gate)·H_up``; with ``HAS_DELTA`` it first adds
  a second ``[M, 2I]`` term into H in place (LoRA's up-projection part, ``moe_tune.ops.lora_block``).
* ``swiglu_backward_kernel`` — given ``dA_raw = G[slot // k]·W2[e]`` (the down dx, unweighted), in
  one pass over each row:

  - ``dH = [dgate | dup]`` of ``dA = w·dA_raw (+ dA_lora)``, w the row's routing weight;
  - ``w·A`` written over dA_raw: the down dW then multiplies expert-ordered dY rows by it with no
    weight in its loop;
  - the routing-weight gradient per token slot, ``⟨dA_raw, A⟩ (+ ⟨P, L2⟩ with LoRA)``: the down
    output row is ``w·(A·W2ᵀ)``, so its weight's gradient is ``⟨G, A·W2ᵀ⟩ = ⟨G·W2, A⟩``, with no
    ``[M, H]`` copy of the unweighted down output.

Why separate kernels and not GEMM epilogues: fused into the up forward's and the down dx's
epilogues they measured slower than these passes plus unfused GEMMs on an H200 (up forward
1.65 ms fused vs 1.33 + ~0.15; down dx 1.65 vs 0.64 + ~0.3, Qwen3-30B-A3B at 16k tokens).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def swiglu_forward_kernel(
    # Pointers --------------------------------------------------------------------------------
    h_ptr,  # (M, 2I): gate | up of the up GEMM (with HAS_DELTA: H + ΔH written back)
    delta_ptr,  # (M, 2I): ΔH, read when HAS_DELTA
    act_ptr,  # (M, I): silu(gate)·up out
    # Sizes -------------------------------------------------------------------------------------
    num_rows,  # M
    inter,  # I
    # Strides -----------------------------------------------------------------------------------
    stride_h_m, stride_delta_m, stride_act_m,
    # Meta-parameters ---------------------------------------------------------------------------
    HAS_DELTA: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Grid: (⌈M / BLOCK_M⌉, ⌈I / BLOCK_N⌉). A program owns the same BLOCK_N columns of the gate
    and the up half."""
    dtype = h_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < num_rows)[:, None] & (cols < inter)[None, :]
    # int64: M·2I passes 2^31 on the largest models at 32k tokens.
    rows64 = rows.to(tl.int64)[:, None]
    h_ptrs = h_ptr + rows64 * stride_h_m + cols[None, :]
    gate = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(h_ptrs + inter, mask=mask, other=0.0).to(tl.float32)
    if HAS_DELTA:
        delta_ptrs = delta_ptr + rows64 * stride_delta_m + cols[None, :]
        gate += tl.load(delta_ptrs, mask=mask, other=0.0).to(tl.float32)
        up += tl.load(delta_ptrs + inter, mask=mask, other=0.0).to(tl.float32)
        tl.store(h_ptrs, gate.to(dtype), mask=mask)
        tl.store(h_ptrs + inter, up.to(dtype), mask=mask)
    act = gate * tl.sigmoid(gate) * up
    tl.store(act_ptr + rows64 * stride_act_m + cols[None, :], act.to(dtype), mask=mask)


@triton.jit
def swiglu_backward_kernel(
    # Pointers --------------------------------------------------------------------------------
    d_act_ptr,  # (M, I): dA_raw in (unweighted); w·silu(gate)·up out
    d_act_lora_ptr,  # (M, I): with LORA, the LoRA part of dA, weight applied: w·(G·B2[e])·A2[e]
    h_ptr,  # (M, 2I): gate | up of the forward
    dh_ptr,  # (M, 2I): d gate | d up out
    weights_ptr,  # (M,) routing weight per token slot
    sorted_slots_ptr,  # (M,) int32: token-slot id of each expert-ordered row
    p_ptr,  # (M, R): with LORA, P = G·B2[e], unweighted
    l_ptr,  # (M, R): with LORA, L2 = A·A2[e]ᵀ of the forward
    d_weights_ptr,  # (M,) per token slot out: ⟨dA_raw, A⟩ (+ ⟨P, L2⟩)
    # Sizes -------------------------------------------------------------------------------------
    num_rows,  # M
    inter,  # I
    rank,  # R (LORA)
    # Strides -----------------------------------------------------------------------------------
    stride_d_act_m, stride_d_act_lora_m, stride_h_m, stride_dh_m, stride_p_m, stride_l_m,
    # Meta-parameters ---------------------------------------------------------------------------
    LORA: tl.constexpr,
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

    # -- SwiGLU backward over the I columns ------------------------------------------------------
    d_weight = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(0, inter, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        mask = row_mask[:, None] & (cols < inter)[None, :]
        d_act_ptrs = d_act_ptr + rows64 * stride_d_act_m + cols[None, :]
        h_ptrs = h_ptr + rows64 * stride_h_m + cols[None, :]
        d_raw = tl.load(d_act_ptrs, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(h_ptrs + inter, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        silu = gate * sig
        act = silu * up
        d_weight += tl.sum(d_raw * act, axis=1)
        d_act = d_raw * w_row
        if LORA:
            d_act += tl.load(d_act_lora_ptr + rows64 * stride_d_act_lora_m + cols[None, :], mask=mask,
                             other=0.0).to(tl.float32)
        dh_ptrs = dh_ptr + rows64 * stride_dh_m + cols[None, :]
        tl.store(dh_ptrs, (d_act * up * sig * (1.0 + gate * (1.0 - sig))).to(dtype), mask=mask)
        tl.store(dh_ptrs + inter, (d_act * silu).to(dtype), mask=mask)
        # Each element is read above before this program overwrites it: dA_raw's buffer is reused.
        tl.store(d_act_ptrs, (act * w_row).to(dtype), mask=mask)

    # -- LoRA's term of the routing-weight gradient: ⟨G, L2·B2ᵀ⟩ = ⟨G·B2, L2⟩ ----------------------
    if LORA:
        for r0 in range(0, rank, BLOCK_R):
            rs = r0 + tl.arange(0, BLOCK_R)
            mask = row_mask[:, None] & (rs < rank)[None, :]
            p = tl.load(p_ptr + rows64 * stride_p_m + rs[None, :], mask=mask, other=0.0).to(tl.float32)
            lo = tl.load(l_ptr + rows64 * stride_l_m + rs[None, :], mask=mask, other=0.0).to(tl.float32)
            d_weight += tl.sum(p * lo, axis=1)
    tl.store(d_weights_ptr + slots, d_weight.to(d_weights_ptr.dtype.element_ty), mask=row_mask)
