"""Triton SwiGLU kernels for the experts block: ``A = silu(gate) · up`` and its backward.

The up GEMM writes ``H [M, 2I]`` per routed row in expert order, gate in columns ``[0, I)`` and
up in ``[I, 2I)`` (transformers v5's concatenated gate_up layout: ``gate, up = h.chunk(2, -1)``).

* ``swiglu_forward_kernel`` — ``A[M, I] = silu(H[:, :I]) · H[:, I:]``, math in float32.
* ``swiglu_backward_kernel`` — given ``dA_raw``, the *unweighted* gradient of the down GEMM's
  input (``dY[token] · W2[e]``), computes in one pass over the row:

  - ``dA = w · dA_raw`` (w = the row's routing weight) and from it ``dH = [dgate, dup]``;
  - the routing-weight gradient ``dw[slot] = Σ_i dA_raw[i] · A[i]``: the down output row is
    ``w · (A · W2ᵀ)``, so its weight's gradient is ``<dY, A·W2ᵀ> = <dY·W2, A>``, which needs no
    ``[M, H]`` copy of the unweighted down output;
  - ``A`` itself, recomputed from ``H`` and written over ``dA_raw`` (the down dW GEMM reads it
    next), so the forward never keeps ``A`` alive for the backward.

Both grids are row-blocked; the backward loops over I inside the program because the weight
gradient is a reduction over the whole row.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def swiglu_forward_kernel(
    # Pointers --------------------------------------------------------------------------------
    h_ptr,  # (M, 2I): gate | up, the up GEMM's output
    a_ptr,  # (M, I): silu(gate) · up
    # Sizes -------------------------------------------------------------------------------------
    num_rows,  # M
    inter,  # I
    # Strides -----------------------------------------------------------------------------------
    stride_h_m,
    stride_a_m,
    # Meta-parameters ---------------------------------------------------------------------------
    BLOCK_M: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    """Grid: (⌈M / BLOCK_M⌉, ⌈I / BLOCK_I⌉)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (rows < num_rows)[:, None] & (cols < inter)[None, :]
    rows64 = rows.to(tl.int64)[:, None]  # M·2I passes 2^31 at T=16384 on qwen3-235b-a22b

    h_ptrs = h_ptr + rows64 * stride_h_m + cols[None, :]
    gate = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(h_ptrs + inter, mask=mask, other=0.0).to(tl.float32)
    a = gate * tl.sigmoid(gate) * up
    tl.store(a_ptr + rows64 * stride_a_m + cols[None, :], a.to(a_ptr.dtype.element_ty), mask=mask)


@triton.jit
def swiglu_backward_kernel(
    # Pointers --------------------------------------------------------------------------------
    h_ptr,  # (M, 2I): gate | up, saved from the forward (expert order)
    da_ptr,  # (M, I): in dA_raw (unweighted), out A = silu(gate) · up, in place
    dh_ptr,  # (M, 2I): out, dgate | dup
    weights_ptr,  # (M,) routing weight per token slot t·k + j
    sorted_slots_ptr,  # (M,) int32: token-slot id of each expert-ordered row
    d_weights_ptr,  # (M,) out, gradient of each routing weight, slot order
    # Sizes -------------------------------------------------------------------------------------
    num_rows,  # M
    inter,  # I
    # Strides -----------------------------------------------------------------------------------
    stride_h_m,
    stride_da_m,
    stride_dh_m,
    # Meta-parameters ---------------------------------------------------------------------------
    BLOCK_M: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    """Grid: (⌈M / BLOCK_M⌉,). Each program owns BLOCK_M whole rows."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < num_rows
    rows64 = rows.to(tl.int64)[:, None]
    slots = tl.load(sorted_slots_ptr + rows, mask=row_mask, other=0)
    w = tl.load(weights_ptr + slots, mask=row_mask, other=0.0).to(tl.float32)[:, None]

    # -- Walk the row in BLOCK_I chunks: gradients out, A back in place, weight gradient summed ---
    d_w = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for i0 in range(0, inter, BLOCK_I):
        cols = i0 + tl.arange(0, BLOCK_I)
        mask = row_mask[:, None] & (cols < inter)[None, :]
        h_ptrs = h_ptr + rows64 * stride_h_m + cols[None, :]
        da_ptrs = da_ptr + rows64 * stride_da_m + cols[None, :]
        dh_ptrs = dh_ptr + rows64 * stride_dh_m + cols[None, :]

        gate = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(h_ptrs + inter, mask=mask, other=0.0).to(tl.float32)
        da_raw = tl.load(da_ptrs, mask=mask, other=0.0).to(tl.float32)

        sig = tl.sigmoid(gate)
        silu = gate * sig
        a = silu * up
        d_w += tl.sum(da_raw * a, axis=1)

        da = da_raw * w
        d_gate = da * up * sig * (1.0 + gate * (1.0 - sig))
        d_up = da * silu
        tl.store(dh_ptrs, d_gate.to(dh_ptr.dtype.element_ty), mask=mask)
        tl.store(dh_ptrs + inter, d_up.to(dh_ptr.dtype.element_ty), mask=mask)
        tl.store(da_ptrs, a.to(da_ptr.dtype.element_ty), mask=mask)

    tl.store(d_weights_ptr + slots, d_w.to(d_weights_ptr.dtype.element_ty), mask=row_mask)
