"""Triton kernels that move routed rows between token order and expert order, around the grouped
GEMMs of the experts block. Both are memory-bound: one pass, wide loads, many rows in flight.

* ``slot_sum_kernel`` — ``out[t] (+)= Σ_j rows[t·k + j]`` over a token's k slot rows, float32
  accumulation and one rounding: the down forward's and the up dx's outputs, written in slot
  order, back to one row per token.
* ``gather_rows_kernel`` — ``dst[r] = src[slots[r] // div]``: a token-ordered tensor's rows copied
  to expert order (the dWs' operands, which then stream through TMA).
* ``copy_kernel`` — up to three flat copies in one launch: a graphed block's inputs into its
  static buffers, and its gradients out of them (one launch where torch makes one per tensor).

Why own kernels: ``torch.sum`` over the slot axis and ``index_select`` ran at ~2.4-2.6 TB/s of the
H200's 4.8 (Qwen3-30B-A3B at 4096 tokens, 58 µs and 57 µs each, twice per fwd+bwd).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def slot_sum_kernel(
    # Pointers --------------------------------------------------------------------------------
    rows_ptr,  # (T·k, W): slot order, the k rows of token t at t·k .. t·k + k - 1
    out_ptr,  # (T, W): written, or added to with ACCUMULATE
    # Sizes -------------------------------------------------------------------------------------
    num_tokens,  # T
    width,  # W
    # Strides -----------------------------------------------------------------------------------
    stride_rows_m, stride_out_t,
    # Meta-parameters ---------------------------------------------------------------------------
    TOPK: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """Grid: (⌈T / BLOCK_T⌉, ⌈W / BLOCK_W⌉)."""
    dtype = out_ptr.dtype.element_ty
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    mask = (tokens < num_tokens)[:, None] & (cols < width)[None, :]
    # int64: T·k·W passes 2^31 at 32k tokens on the largest models.
    first = rows_ptr + (tokens.to(tl.int64) * TOPK)[:, None] * stride_rows_m + cols[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_W), dtype=tl.float32)
    for j in tl.static_range(TOPK):  # k independent loads in flight per element
        acc += tl.load(first + j * stride_rows_m, mask=mask, other=0.0).to(tl.float32)
    out_ptrs = out_ptr + tokens.to(tl.int64)[:, None] * stride_out_t + cols[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, acc.to(dtype), mask=mask)


@triton.jit
def gather_rows_kernel(
    # Pointers --------------------------------------------------------------------------------
    src_ptr,  # (S, W): token order
    slots_ptr,  # (R,) int32: the slot of each destination row (expert order)
    dst_ptr,  # (R, W)
    # Sizes -------------------------------------------------------------------------------------
    num_rows,  # R
    width,  # W
    div,  # source row = slot // div (k: a token's row for each of its k slots)
    # Strides -----------------------------------------------------------------------------------
    stride_src_s, stride_src_w,  # any strides: an output gradient may be expanded (stride 0)
    stride_dst_r,
    # Meta-parameters ---------------------------------------------------------------------------
    BLOCK_R: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """Grid: (⌈R / BLOCK_R⌉, ⌈W / BLOCK_W⌉)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    row_mask = rows < num_rows
    mask = row_mask[:, None] & (cols < width)[None, :]
    src_rows = tl.load(slots_ptr + rows, mask=row_mask, other=0) // div
    values = tl.load(src_ptr + src_rows.to(tl.int64)[:, None] * stride_src_s + cols[None, :] * stride_src_w,
                     mask=mask)
    tl.store(dst_ptr + rows.to(tl.int64)[:, None] * stride_dst_r + cols[None, :], values, mask=mask)


@triton.jit
def _copy_block(src_ptr, dst_ptr, n, block, BLOCK: tl.constexpr):
    offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=mask), mask=mask)


@triton.jit
def copy_kernel(
    src0_ptr, dst0_ptr, n0,  # n elements of contiguous tensors, each pair of one dtype
    src1_ptr, dst1_ptr, n1,
    src2_ptr, dst2_ptr, n2,
    BLOCK: tl.constexpr,
):
    """Grid: (⌈n0 / BLOCK⌉ + ⌈n1 / BLOCK⌉ + ⌈n2 / BLOCK⌉,). A copy of no elements launches no
    program (its pointers may repeat another pair's)."""
    pid = tl.program_id(0)
    blocks0 = tl.cdiv(n0, BLOCK)
    blocks01 = blocks0 + tl.cdiv(n1, BLOCK)
    if pid < blocks0:
        _copy_block(src0_ptr, dst0_ptr, n0, pid, BLOCK)
    elif pid < blocks01:
        _copy_block(src1_ptr, dst1_ptr, n1, pid - blocks0, BLOCK)
    else:
        _copy_block(src2_ptr, dst2_ptr, n2, pid - blocks01, BLOCK)
