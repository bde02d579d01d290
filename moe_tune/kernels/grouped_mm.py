"""Triton grouped-GEMM kernels for the expert layers of an MoE model.

Two kernels serve the three passes of every expert GEMM (weights ``W[E, N, K]``, ``y = x·Wᵀ``):

* ``grouped_mm_kernel`` — ``C[rows of e] = A[rows of e] · B_e`` with B_e = W[e]ᵀ (forward) or
  W[e] (dx; the launcher swaps W's strides, and for TMA the kernel reads W's tile untransposed).
  Rows may be gathered on load (A row = slot // gather_div), scattered on store (C row = slot)
  and multiplied by their routing weight on store. A gathering pass may also write the rows it
  gathers in expert order (``SORT_A``), for a dW that then reads both operands through TMA.
* ``grouped_mm_dw_kernel`` — ``dW[e] = dY[rows of e]ᵀ · X[rows of e]``, parallel over experts
  *and* N×K output tiles, each program reducing over its expert's rows. (A decomposition over
  N×K tiles alone, looping over all experts inside, caps out near 100 TFLOP/s on Qwen3-30B-A3B.)

Both use a persistent grid of ``NUM_SMS`` programs striding over tiles. The routing arrives as
``expert_offsets`` (``[E+1]`` int32, rows of expert e are ``[offs[e], offs[e+1])`` in expert
order) and ``sorted_slots`` (``[M]`` int32, the token-slot id ``t·k + j`` of each row): both are
runtime data, so one compile serves every token count and every routing.

Every tunable parameter arrives as a constexpr named exactly like the cache's config keys.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _expert_of_block(block, cum_blocks_end, blocks, e_range):
    """Map a global row-block index to (expert, block index within that expert).

    ``cum_blocks_end[e]`` is the inclusive prefix sum of row blocks per expert, held in registers:
    the expert is the number of experts whose blocks all end at or before ``block``.
    """
    e = tl.sum((cum_blocks_end <= block).to(tl.int32), axis=0)
    first_block = tl.sum(tl.where(e_range == e, cum_blocks_end - blocks, 0), axis=0)
    return e, block - first_block


@triton.jit
def _reduce(a_ptrs, w_ptrs, sorted_ptrs, a_desc, w_desc, row0, e, n_block, row_mask, col_mask,
            red, stride_a_k, stride_w_red,
            TRANS_W: tl.constexpr, GATHER_A: tl.constexpr, STORE_A: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TMA_LOAD: tl.constexpr,
            DOT_PRECISION: tl.constexpr, WARP_SPEC: tl.constexpr):
    """The K loop of ``grouped_mm_kernel``: the [BLOCK_M, BLOCK_N] float32 accumulator over the
    whole reduction. STORE_A also writes each A tile to ``sorted_ptrs`` (the gathered rows in
    expert order)."""
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if WARP_SPEC:
        # Both operands through TMA, nothing carried but the accumulator: what Triton's Hopper
        # warp specialisation partitions (one producer warpgroup issuing the copies, two consumer
        # warpgroups splitting the tile's rows).
        for k0 in tl.range(0, red, BLOCK_K, warp_specialize=True):
            a = a_desc.load([row0, k0])
            if TRANS_W:
                b = w_desc.load([e, k0, n_block * BLOCK_N]).reshape(BLOCK_K, BLOCK_N)
            else:
                b = w_desc.load([e, n_block * BLOCK_N, k0]).reshape(BLOCK_N, BLOCK_K).T
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    else:
        for k0 in range(0, red, BLOCK_K):
            k_mask = ks < red - k0
            if TMA_LOAD and not GATHER_A:
                a = a_desc.load([row0, k0])
            else:
                a = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
            if STORE_A:
                tl.store(sorted_ptrs, a, mask=row_mask[:, None] & k_mask[None, :])
                sorted_ptrs += BLOCK_K
            if TMA_LOAD:
                if TRANS_W:
                    b = w_desc.load([e, k0, n_block * BLOCK_N]).reshape(BLOCK_K, BLOCK_N)
                else:
                    b = w_desc.load([e, n_block * BLOCK_N, k0]).reshape(BLOCK_N, BLOCK_K).T
            else:
                b = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
            a_ptrs += BLOCK_K * stride_a_k
            w_ptrs += BLOCK_K * stride_w_red
    return acc


@triton.jit
def grouped_mm_kernel(
    # Pointers --------------------------------------------------------------------------------
    a_ptr,  # (A_ROWS, RED): X (forward) or dY (dx); token order when GATHER_A, else expert order
    w_ptr,  # (E, N, K): the expert weights as the model stores them
    c_ptr,  # (M, OUT): slot order when SCATTER_C, else expert order
    expert_offsets_ptr,  # (E + 1,) int32
    sorted_slots_ptr,  # (M,) int32: token-slot id of each expert-ordered row
    weights_ptr,  # (M,) routing weight of each token slot (read when WEIGHTED)
    sorted_a_ptr,  # (M, RED) expert order: SORT_A writes the gathered A rows here; with WARP_SPEC
    #               the int32 row-block table: [row blocks, then (expert, first row) per block]
    # Sizes -------------------------------------------------------------------------------------
    a_rows,  # rows of A (T when gathering, M otherwise): bounds the TMA descriptor
    out_cols,  # OUT: N for forward, K for dx
    red,  # RED: K for forward, N for dx
    gather_div,  # gathered A row = slot // gather_div (topk from token order, 1 from slot order)
    # Strides -----------------------------------------------------------------------------------
    stride_a_m, stride_a_k,
    stride_w_e, stride_w_red, stride_w_out,  # W's strides along expert, reduction, output column
    stride_c_m, stride_c_n,
    # Meta-parameters ---------------------------------------------------------------------------
    E: tl.constexpr,
    E_POW2: tl.constexpr,
    TRANS_W: tl.constexpr,  # dx: W[e] is read as [RED=N, OUT=K] (its stored orientation)
    GATHER_A: tl.constexpr,
    SCATTER_C: tl.constexpr,
    WEIGHTED: tl.constexpr,
    SORT_A: tl.constexpr,  # also write the gathered A rows in expert order (for a dW with TMA)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    TMA_LOAD: tl.constexpr,
    TMA_STORE: tl.constexpr,
    NUM_SMS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # tl.dot's input_precision: "tf32" (float32 as TF32) or "tf32x3"
    WARP_SPEC: tl.constexpr,  # warp-specialised K loop (TMA on both operands, nothing gathered)
):
    """Grid: (min(NUM_SMS, upper bound on tiles),). Each program strides over output tiles."""
    pid = tl.program_id(0)
    dtype = w_ptr.dtype.element_ty

    # -- Row blocks per expert, computed once per program from the offsets -----------------------
    # (WARP_SPEC: read from the row-block table. Triton's Hopper warp specialisation rejects a
    # kernel whose specialised loop depends on a reduction, as the register search does.)
    e_range = tl.arange(0, E_POW2)
    if WARP_SPEC:
        num_m_blocks = tl.load(sorted_a_ptr)
    else:
        starts = tl.load(expert_offsets_ptr + e_range, mask=e_range < E, other=0)
        ends = tl.load(expert_offsets_ptr + e_range + 1, mask=e_range < E, other=0)
        blocks = tl.cdiv(ends - starts, BLOCK_M)
        cum_blocks_end = tl.cumsum(blocks, axis=0)
        num_m_blocks = tl.sum(blocks, axis=0)
    num_n_blocks = tl.cdiv(out_cols, BLOCK_N)
    num_tiles = num_m_blocks * num_n_blocks

    # Without TMA the descriptors are never read: plain pointers stand in so _reduce's
    # signature stays one.
    a_desc = a_ptr
    w_desc = w_ptr
    if TMA_LOAD:
        # W as a 3-D tensor: one descriptor serves every expert (expert index is a coordinate).
        if TRANS_W:
            w_desc = tl.make_tensor_descriptor(
                w_ptr, shape=[E, red, out_cols], strides=[stride_w_e, stride_w_red, 1],
                block_shape=[1, BLOCK_K, BLOCK_N],
            )
        else:
            w_desc = tl.make_tensor_descriptor(
                w_ptr, shape=[E, out_cols, red], strides=[stride_w_e, stride_w_out, 1],
                block_shape=[1, BLOCK_N, BLOCK_K],
            )
        if not GATHER_A:
            # Rows past the expert's end belong to the next expert: they are computed and dropped.
            a_desc = tl.make_tensor_descriptor(
                a_ptr, shape=[a_rows, red], strides=[stride_a_m, 1], block_shape=[BLOCK_M, BLOCK_K],
            )

    for tile in range(pid, num_tiles, NUM_SMS):
        # -- Map tile id to (row block, column block), GROUP_M row blocks at a time -------------
        tiles_per_group = GROUP_M * num_n_blocks
        group = tile // tiles_per_group
        first_m = group * GROUP_M
        group_rows = tl.minimum(num_m_blocks - first_m, GROUP_M)
        m_block = first_m + (tile % tiles_per_group) % group_rows
        n_block = (tile % tiles_per_group) // group_rows

        if WARP_SPEC:
            e = tl.load(sorted_a_ptr + 1 + 2 * m_block)
            row0 = tl.load(sorted_a_ptr + 2 + 2 * m_block)
            row_start = tl.load(expert_offsets_ptr + e)
            row_end = tl.load(expert_offsets_ptr + e + 1)
        else:
            e, local_block = _expert_of_block(m_block, cum_blocks_end, blocks, e_range)
            row_start = tl.load(expert_offsets_ptr + e)
            row_end = tl.load(expert_offsets_ptr + e + 1)
            row0 = row_start + local_block * BLOCK_M

        # -- Rows of this tile; rows past the expert's end are clamped to a valid row ------------
        rows = row0 + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        rows = tl.where(row_mask, rows, row_start)
        if GATHER_A or SCATTER_C or WEIGHTED:
            slots = tl.load(sorted_slots_ptr + rows)
        if GATHER_A:
            a_row_ids = slots // gather_div
        else:
            a_row_ids = rows
        cols = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < out_cols
        ks = tl.arange(0, BLOCK_K)

        # int64: E·N·K passes 2^31 on deepseek-v3 (7.5e9 elements in gate_up).
        e64 = e.to(tl.int64)
        a_ptrs = a_ptr + a_row_ids.to(tl.int64)[:, None] * stride_a_m + ks[None, :] * stride_a_k
        w_ptrs = w_ptr + e64 * stride_w_e + ks[:, None] * stride_w_red + cols[None, :] * stride_w_out
        sorted_ptrs = sorted_a_ptr + rows.to(tl.int64)[:, None] * red + ks[None, :]

        # -- Reduction loop: the first column block also copies A's rows out (once per row), in
        # its own instance of the loop so that every other tile's loop stays free of the store ----
        if SORT_A:
            if n_block == 0:
                acc = _reduce(a_ptrs, w_ptrs, sorted_ptrs, a_desc, w_desc, row0, e, n_block, row_mask, col_mask, red,
                              stride_a_k, stride_w_red, TRANS_W, GATHER_A, True, BLOCK_M, BLOCK_N, BLOCK_K, TMA_LOAD,
                              DOT_PRECISION, WARP_SPEC)
            else:
                acc = _reduce(a_ptrs, w_ptrs, sorted_ptrs, a_desc, w_desc, row0, e, n_block, row_mask, col_mask, red,
                              stride_a_k, stride_w_red, TRANS_W, GATHER_A, False, BLOCK_M, BLOCK_N, BLOCK_K, TMA_LOAD,
                              DOT_PRECISION, WARP_SPEC)
        else:
            acc = _reduce(a_ptrs, w_ptrs, sorted_ptrs, a_desc, w_desc, row0, e, n_block, row_mask, col_mask, red,
                          stride_a_k, stride_w_red, TRANS_W, GATHER_A, False, BLOCK_M, BLOCK_N, BLOCK_K, TMA_LOAD,
                              DOT_PRECISION, WARP_SPEC)

        # -- Epilogue: routing weight, then masked (or TMA) write-back --------------------------------
        if WEIGHTED:
            acc = acc * tl.load(weights_ptr + slots).to(tl.float32)[:, None]
        c = acc.to(dtype)
        if SCATTER_C:
            c_rows = slots
        else:
            c_rows = rows
        if TMA_STORE:
            # The descriptor ends at the expert's last row, so TMA clips the rows of the next expert.
            c_desc = tl.make_tensor_descriptor(
                c_ptr, shape=[row_end, out_cols], strides=[stride_c_m, 1], block_shape=[BLOCK_M, BLOCK_N],
            )
            c_desc.store([row0, n_block * BLOCK_N], c)
        else:
            c_ptrs = c_ptr + c_rows.to(tl.int64)[:, None] * stride_c_m + cols[None, :] * stride_c_n
            tl.store(c_ptrs, c, mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def grouped_mm_dw_kernel(
    # Pointers --------------------------------------------------------------------------------
    dy_ptr,  # (DY_ROWS, N): gathered (row = slot // dy_div) when GATHER_DY, else expert order
    x_ptr,  # (X_ROWS, K): gathered (row = slot // x_div) when GATHER_X, else expert order
    dw_ptr,  # (E, N, K)
    expert_offsets_ptr,  # (E + 1,) int32
    sorted_slots_ptr,  # (M,) int32
    weights_ptr,  # (M,) routing weight per token slot, scales dY rows when WEIGHTED
    # Sizes -------------------------------------------------------------------------------------
    N, K,
    dy_div, x_div,
    # Strides -----------------------------------------------------------------------------------
    stride_dy_m, stride_dy_n,
    stride_x_m, stride_x_k,
    stride_dw_e, stride_dw_n, stride_dw_k,
    # Meta-parameters ---------------------------------------------------------------------------
    E: tl.constexpr,
    GATHER_DY: tl.constexpr,
    GATHER_X: tl.constexpr,
    WEIGHTED: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows reduced per step
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,  # N blocks that walk K blocks together (L2 reuse of the X columns)
    TMA_LOAD: tl.constexpr,
    TMA_STORE: tl.constexpr,
    NUM_SMS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WARP_SPEC: tl.constexpr,  # warp-specialised row loop (both operands through TMA, 2-D TMA store)
):
    """Grid: (min(NUM_SMS, E·⌈N/BLOCK_N⌉·⌈K/BLOCK_K⌉),). Tiles are expert-major so programs
    running at the same time share an expert's rows in L2."""
    pid = tl.program_id(0)
    dtype = dw_ptr.dtype.element_ty
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    num_k_blocks = tl.cdiv(K, BLOCK_K)
    tiles_per_expert = num_n_blocks * num_k_blocks
    num_tiles = E * tiles_per_expert

    if TMA_STORE:
        if WARP_SPEC:
            # dW as [E·N, K] (contiguous, N a multiple of BLOCK_N: check_config): the compiler's
            # warp specialisation aborts on the 3-D store below.
            dw_desc = tl.make_tensor_descriptor(
                dw_ptr, shape=[E * N, K], strides=[stride_dw_n, 1], block_shape=[BLOCK_N, BLOCK_K],
            )
        else:
            dw_desc = tl.make_tensor_descriptor(
                dw_ptr, shape=[E, N, K], strides=[stride_dw_e, stride_dw_n, 1], block_shape=[1, BLOCK_N, BLOCK_K],
            )

    for tile in range(pid, num_tiles, NUM_SMS):
        # -- Map tile id to (expert, N block, K block), swizzled within the expert ---------------
        e = tile // tiles_per_expert
        t = tile % tiles_per_expert
        tiles_per_group = GROUP_M * num_k_blocks
        first_n = (t // tiles_per_group) * GROUP_M
        group_rows = tl.minimum(num_n_blocks - first_n, GROUP_M)
        n_block = first_n + (t % tiles_per_group) % group_rows
        k_block = (t % tiles_per_group) // group_rows

        row_start = tl.load(expert_offsets_ptr + e)
        row_end = tl.load(expert_offsets_ptr + e + 1)
        ns = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = k_block * BLOCK_K + tl.arange(0, BLOCK_K)
        n_mask = ns < N
        k_mask = ks < K

        if TMA_LOAD:
            # Descriptors end at the expert's last row: TMA zero-fills the rows past it, so the
            # tiles go straight from the copy engine to the tensor cores with no masking in registers
            # (a tl.where on a TMA tile measured 227 -> 175 TFLOP/s on Qwen3-30B-A3B's up dW).
            if not GATHER_DY:
                dy_desc = tl.make_tensor_descriptor(
                    dy_ptr, shape=[row_end, N], strides=[stride_dy_m, 1], block_shape=[BLOCK_M, BLOCK_N],
                )
            if not GATHER_X:
                x_desc = tl.make_tensor_descriptor(
                    x_ptr, shape=[row_end, K], strides=[stride_x_m, 1], block_shape=[BLOCK_M, BLOCK_K],
                )

        # -- Reduce over the expert's rows (an empty expert leaves zeros) -------------------------
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for m0 in tl.range(row_start, row_end, BLOCK_M, warp_specialize=WARP_SPEC):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_mask = rows < row_end
            rows = tl.where(row_mask, rows, row_start)
            if GATHER_DY or GATHER_X or WEIGHTED:
                slots = tl.load(sorted_slots_ptr + rows)

            if TMA_LOAD and not GATHER_DY:
                dy = dy_desc.load([m0, n_block * BLOCK_N])
            else:
                if GATHER_DY:
                    dy_row_ids = slots // dy_div
                else:
                    dy_row_ids = rows
                dy_ptrs = dy_ptr + dy_row_ids.to(tl.int64)[:, None] * stride_dy_m + ns[None, :] * stride_dy_n
                dy = tl.load(dy_ptrs, mask=row_mask[:, None] & n_mask[None, :], other=0.0)
            if WEIGHTED:
                dy = (dy.to(tl.float32) * tl.load(weights_ptr + slots).to(tl.float32)[:, None]).to(dtype)

            if TMA_LOAD and not GATHER_X:
                x = x_desc.load([m0, k_block * BLOCK_K])
            else:
                if GATHER_X:
                    x_row_ids = slots // x_div
                else:
                    x_row_ids = rows
                x_ptrs = x_ptr + x_row_ids.to(tl.int64)[:, None] * stride_x_m + ks[None, :] * stride_x_k
                x = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)

            acc = tl.dot(dy.T, x, acc, input_precision=DOT_PRECISION)

        # -- Write back the expert's [BLOCK_N, BLOCK_K] tile ----------------------------------------
        dw = acc.to(dtype)
        if TMA_STORE and WARP_SPEC:
            dw_desc.store([e * N + n_block * BLOCK_N, k_block * BLOCK_K], dw)
        elif TMA_STORE:
            dw_desc.store([e, n_block * BLOCK_N, k_block * BLOCK_K], dw.reshape(1, BLOCK_N, BLOCK_K))
        else:
            dw_ptrs = (dw_ptr + e.to(tl.int64) * stride_dw_e
                       + ns[:, None].to(tl.int64) * stride_dw_n + ks[None, :] * stride_dw_k)
            tl.store(dw_ptrs, dw, mask=n_mask[:, None] & k_mask[None, :])
