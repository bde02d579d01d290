"""Triton kernels of the gpt-oss experts block that are not GEMMs: the clamped, interleaved SwiGLU
with the up projection's bias, the combine with the down projection's bias, and one backward pass
for the activation, both bias gradients and the routing-weight gradient.

gpt-oss (transformers ``GptOssExperts``) interleaves gate and up: column 2j of the up projection's
output is gate j, column 2j+1 is up j. A tile over I columns therefore reads a contiguous
[rows, 2·BLOCK_N] slab and splits it in registers (``tl.reshape`` to [rows, BLOCK_N, 2] +
``tl.split``); the backward joins dgate and dup the same way, so every access is coalesced.

The activation, with limit and alpha from the module (7 and 1.702 in the released models)::

    g = min(gate, limit)            u = clamp(up, -limit, limit)
    a = (u + 1) · g · σ(alpha · g)

Its gradient follows ``torch.clamp``'s: zero where the input lies strictly outside the limits,
passed through at the limits themselves.

Rows are in expert order (the order the grouped GEMMs write); the expert of a row is
``top_k_index.flat[sorted_slots[row]]``, two small loads instead of a search over the offsets.

The backward walks each expert's rows in a software-pipelined loop. Where rows are 16-byte aligned
its dA and H tiles come through tensor descriptors that end at the expert's last row, so the copy
engine fetches the next steps into shared memory while a step computes (1.08-1.53× the pointer loop
at gpt-oss shapes on an H200; BENCHMARKS.md, eleventh session). With 16-bit activations it reads H
and writes dH as 32-bit words, one (gate, up) pair each (``PACKED``), so every tile of a step has
one shape and one layout: the split slabs made the compiler load H twice, in two layouts (1.25-1.48×
at gpt-oss shapes, H200; fifteenth session). Its stores are plain, and the bias gradients are summed
over rows once per program: descriptor stores and per-step row sums each put barriers in every step
(1.22× without both, sixteenth session).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _load_pairs(ptr, rows, stride_m, cols2, mask2):
    """[BLOCK_M, 2·BLOCK_N] interleaved slab → (even columns, odd columns), float32."""
    x = tl.load(ptr + rows.to(tl.int64)[:, None] * stride_m + cols2[None, :], mask=mask2, other=0.0)
    return tl.split(tl.reshape(x.to(tl.float32), [x.shape[0], x.shape[1] // 2, 2]))


@triton.jit
def _unpack_pairs(words, elem: tl.constexpr):
    """32-bit words each holding one interleaved (gate, up) pair of 16-bit ``elem`` values (gate in
    the low half: the lower address) → (gate, up) in float32, with no change of layout."""
    gate = words.to(tl.int16).to(elem, bitcast=True).to(tl.float32)
    up = (words >> 16).to(tl.int16).to(elem, bitcast=True).to(tl.float32)
    return gate, up


@triton.jit
def _pack_pairs(gate, up, elem: tl.constexpr):
    """``_unpack_pairs``' inverse: (gate, up) rounded to ``elem`` and packed into 32-bit words."""
    low = gate.to(elem).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    high = up.to(elem).to(tl.int16, bitcast=True).to(tl.int32) << 16
    return high | low


@triton.jit
def _bias_pairs(b_ptr, experts, stride_b_e, cols2, mask2):
    """The bias of each row's expert over the slab's columns, split like ``_load_pairs``."""
    b = tl.load(b_ptr + experts.to(tl.int64)[:, None] * stride_b_e + cols2[None, :], mask=mask2, other=0.0)
    return tl.split(tl.reshape(b.to(tl.float32), [b.shape[0], b.shape[1] // 2, 2]))


@triton.jit
def _as_float32(scalar):
    """A float scalar argument in float32: eager launches type a Python float fp32, but
    Inductor's launch of a user kernel (the torch.compile path) types it fp64, which would turn
    the float32 accumulators it meets into fp64 ones."""
    return tl.cast(scalar, tl.float32)


@triton.jit
def _clamped_glu(gate, up, limit, alpha):
    """(a, g, u, sigmoid(alpha·g)) of the clamped SwiGLU, float32."""
    g = tl.minimum(gate, limit)
    u = tl.minimum(tl.maximum(up, -limit), limit)
    sig = tl.sigmoid(alpha * g)
    return (u + 1.0) * g * sig, g, u, sig


@triton.jit
def gptoss_act_fwd_kernel(
    # Pointers --------------------------------------------------------------------------------
    h_ptr,  # (M, 2I) expert order: X·W1[e] without its bias, gate/up interleaved
    delta_ptr,  # (M, 2I) expert order: the LoRA part of H (HAS_DELTA), added into h
    b1_ptr,  # (E, 2I): gate_up_proj_bias, interleaved like h
    a_ptr,  # (M, I) expert order: the activation, the down GEMM's input
    sorted_slots_ptr,  # (M,) int32: token-slot id of each expert-ordered row
    top_k_index_ptr,  # (M,) int32 or int64: expert of each token slot (top_k_index flattened)
    # Sizes -------------------------------------------------------------------------------------
    num_rows,  # M
    inter,  # I
    limit,  # swiglu_limit
    alpha,  # swiglu_alpha
    # Strides -----------------------------------------------------------------------------------
    stride_h_m, stride_delta_m, stride_b1_e, stride_a_m,
    # Meta-parameters ---------------------------------------------------------------------------
    HAS_DELTA: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Grid: (⌈M / BLOCK_M⌉, ⌈I / BLOCK_N⌉). A = clamped SwiGLU of (H + b1[e]); with HAS_DELTA,
    H + delta is first stored over H (rounded as H is), so the backward reads the sum."""
    limit, alpha = _as_float32(limit), _as_float32(alpha)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < num_rows
    slots = tl.load(sorted_slots_ptr + rows, mask=row_mask, other=0)
    experts = tl.load(top_k_index_ptr + slots, mask=row_mask, other=0)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols2 = pid_n * 2 * BLOCK_N + tl.arange(0, 2 * BLOCK_N)
    mask2 = row_mask[:, None] & (cols2 < 2 * inter)[None, :]

    if HAS_DELTA:
        h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_h_m + cols2[None, :]
        total = tl.load(h_ptrs, mask=mask2, other=0.0).to(tl.float32)
        total += tl.load(delta_ptr + rows.to(tl.int64)[:, None] * stride_delta_m + cols2[None, :], mask=mask2,
                         other=0.0).to(tl.float32)
        total = total.to(h_ptr.dtype.element_ty)
        tl.store(h_ptrs, total, mask=mask2)
        gate, up = tl.split(tl.reshape(total.to(tl.float32), [BLOCK_M, BLOCK_N, 2]))
    else:
        gate, up = _load_pairs(h_ptr, rows, stride_h_m, cols2, mask2)
    b_gate, b_up = _bias_pairs(b1_ptr, experts, stride_b1_e, cols2, mask2)
    a, _g, _u, _sig = _clamped_glu(gate + b_gate, up + b_up, limit, alpha)

    mask = row_mask[:, None] & (cols < inter)[None, :]
    tl.store(a_ptr + rows.to(tl.int64)[:, None] * stride_a_m + cols[None, :], a.to(a_ptr.dtype.element_ty), mask=mask)


@triton.jit
def gptoss_combine_kernel(
    # Pointers --------------------------------------------------------------------------------
    y_ptr,  # (T·k, H) slot order: w · A·W2[e] per slot (the down GEMM, weighted in its epilogue)
    y2_ptr,  # (T·k, H) slot order, HAS_Y2: a second term per slot (the down LoRA's w · L2·B̃2ᵀ)
    b2_ptr,  # (E, H): down_proj_bias
    weights_ptr,  # (T·k,): routing weight of each slot
    top_k_index_ptr,  # (T·k,) int32 or int64
    out_ptr,  # (T, H)
    # Sizes -------------------------------------------------------------------------------------
    num_tokens,  # T
    hidden,  # H
    topk,  # k
    # Strides -----------------------------------------------------------------------------------
    stride_y_m, stride_y2_m, stride_b2_e, stride_out_t,
    # Meta-parameters ---------------------------------------------------------------------------
    HAS_Y2: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Grid: (⌈T / BLOCK_T⌉, ⌈H / BLOCK_N⌉). out[t] = Σ_j (Y[t·k+j] (+ Y2[t·k+j]) + w[t,j]·b2[e_tj]),
    summed in float32: the bias joins the k-slot sum the block needs anyway, so it costs no pass."""
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    tokens = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    token_mask = tokens < num_tokens
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = token_mask[:, None] & (cols < hidden)[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for j in range(topk):
        slots = tokens.to(tl.int64) * topk + j
        experts = tl.load(top_k_index_ptr + slots, mask=token_mask, other=0)
        w = tl.load(weights_ptr + slots, mask=token_mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + slots[:, None] * stride_y_m + cols[None, :], mask=mask, other=0.0)
        b = tl.load(b2_ptr + experts.to(tl.int64)[:, None] * stride_b2_e + cols[None, :], mask=mask, other=0.0)
        acc += y.to(tl.float32) + w[:, None] * b.to(tl.float32)
        if HAS_Y2:
            acc += tl.load(y2_ptr + slots[:, None] * stride_y2_m + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    out_ptrs = out_ptr + tokens.to(tl.int64)[:, None] * stride_out_t + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _act_bwd_tile(
    d_act_ptr, d_lora_ptr, p_ptr, l2_ptr, h_ptr, b1_ptr, weights_ptr, sorted_slots_ptr, d_h_ptr,
    weighted_act_ptr, dsp_ptr, db1_ptr,
    e, row_start, row_end, n_block, num_rows, inter, rank, limit, alpha,
    stride_da_m, stride_dl_m, stride_p_m, stride_l2_m, stride_h_m, stride_b1_e, stride_dh_m, stride_wa_m,
    stride_db1_e,
    LORA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    STAGES: tl.constexpr, TMA: tl.constexpr, PACKED: tl.constexpr,
):
    """Columns [n, n+BLOCK_N) of I over every row of expert e: dH, w·A, the ⟨dA_raw, A⟩ part of
    the routing-weight gradient and this column block of db1[e]. With LORA, dA gains the down
    LoRA's (already weighted) dA_lora, and column block 0 adds ⟨P, L2⟩ to its partial: the LoRA
    output's part of the routing-weight gradient. With PACKED (16-bit activations), H and dH come
    as int32 views [M, I] whose every word is one (gate, up) pair, so each step's tiles are all
    [BLOCK_M, BLOCK_N] in one layout (the interleaved [BLOCK_M, 2·BLOCK_N] slab split in registers
    made the compiler load H twice, in two layouts)."""
    elem = d_act_ptr.dtype.element_ty
    cols = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < inter
    cols2 = n_block * 2 * BLOCK_N + tl.arange(0, 2 * BLOCK_N)
    col_mask2 = cols2 < 2 * inter
    # One expert per program: its bias row is loaded once, broadcast over the rows.
    b = tl.load(b1_ptr + e.to(tl.int64) * stride_b1_e + cols2, mask=col_mask2, other=0.0).to(tl.float32)
    b_gate, b_up = tl.split(tl.reshape(b, [BLOCK_N, 2]))
    # The bias gradient accumulates per element and is summed over rows once, after the loop: a sum
    # over each step's rows crosses warps (shared memory and a barrier every step).
    db_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    db_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if TMA:
        # Descriptors that end at the expert's last row: the copy engine zero-fills the rows past
        # it, and the software pipeline keeps STAGES - 1 steps of loads in flight in shared memory
        # rather than in registers. The stores stay plain: through a descriptor a store goes by
        # shared memory, and each step would wait for the previous step's to leave it.
        da_desc = tl.make_tensor_descriptor(d_act_ptr, shape=[row_end, inter], strides=[stride_da_m, 1],
                                            block_shape=[BLOCK_M, BLOCK_N])
        if PACKED:
            h_desc = tl.make_tensor_descriptor(h_ptr, shape=[row_end, inter], strides=[stride_h_m, 1],
                                               block_shape=[BLOCK_M, BLOCK_N])
        else:
            h_desc = tl.make_tensor_descriptor(h_ptr, shape=[row_end, 2 * inter], strides=[stride_h_m, 1],
                                               block_shape=[BLOCK_M, 2 * BLOCK_N])
    for m0 in tl.range(row_start, row_end, BLOCK_M, num_stages=STAGES):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        rows64 = rows.to(tl.int64)
        slots = tl.load(sorted_slots_ptr + rows, mask=row_mask, other=0)
        w = tl.load(weights_ptr + slots, mask=row_mask, other=0.0).to(tl.float32)[:, None]
        mask = row_mask[:, None] & col_mask[None, :]
        mask2 = row_mask[:, None] & col_mask2[None, :]
        if TMA:
            d_act = da_desc.load([m0, n_block * BLOCK_N]).to(tl.float32)
            if PACKED:
                gate, up = _unpack_pairs(h_desc.load([m0, n_block * BLOCK_N]), elem)
            else:
                pairs = h_desc.load([m0, n_block * 2 * BLOCK_N]).to(tl.float32)
                gate, up = tl.split(tl.reshape(pairs, [BLOCK_M, BLOCK_N, 2]))
        else:
            d_act = tl.load(d_act_ptr + rows64[:, None] * stride_da_m + cols[None, :], mask=mask, other=0.0)
            d_act = d_act.to(tl.float32)
            if PACKED:
                words = tl.load(h_ptr + rows64[:, None] * stride_h_m + cols[None, :], mask=mask, other=0)
                gate, up = _unpack_pairs(words, elem)
            else:
                gate, up = _load_pairs(h_ptr, rows, stride_h_m, cols2, mask2)
        gate += b_gate[None, :]
        up += b_up[None, :]
        a, g, u, sig = _clamped_glu(gate, up, limit, alpha)

        # d weight[slot] gets <dY·W2ᵀ, A> over I (this block's columns here, summed on the host
        # side in a fixed order) plus <dY, b2[e]> from the down-bias programs.
        partial = tl.sum(d_act * a, axis=1)
        d_a = d_act * w
        if LORA:
            d_a += tl.load(d_lora_ptr + rows64[:, None] * stride_dl_m + cols[None, :], mask=mask,
                           other=0.0).to(tl.float32)
            if n_block == 0:
                r_cols = tl.arange(0, BLOCK_R)
                r_mask = row_mask[:, None] & (r_cols < rank)[None, :]
                p = tl.load(p_ptr + rows64[:, None] * stride_p_m + r_cols[None, :], mask=r_mask, other=0.0)
                l2 = tl.load(l2_ptr + rows64[:, None] * stride_l2_m + r_cols[None, :], mask=r_mask, other=0.0)
                partial += tl.sum(p.to(tl.float32) * l2.to(tl.float32), axis=1)
        tl.store(dsp_ptr + n_block.to(tl.int64) * num_rows + slots, partial, mask=row_mask)
        tl.store(weighted_act_ptr + rows64[:, None] * stride_wa_m + cols[None, :],
                 (w * a).to(weighted_act_ptr.dtype.element_ty), mask=mask)

        # Clamped elements pass no gradient (torch.clamp's rule: the limits themselves pass).
        d_up = tl.where((up >= -limit) & (up <= limit), d_a * g * sig, 0.0)
        d_gate = tl.where(gate <= limit, d_a * (u + 1.0) * sig * (1.0 + alpha * g * (1.0 - sig)), 0.0)
        d_up = tl.where(mask, d_up, 0.0)
        d_gate = tl.where(mask, d_gate, 0.0)
        db_gate += d_gate
        db_up += d_up
        if PACKED:
            d_h = _pack_pairs(d_gate, d_up, elem)
            tl.store(d_h_ptr + rows64[:, None] * stride_dh_m + cols[None, :], d_h, mask=mask)
        else:
            d_h = tl.reshape(tl.join(d_gate, d_up), [BLOCK_M, 2 * BLOCK_N]).to(d_h_ptr.dtype.element_ty)
            tl.store(d_h_ptr + rows64[:, None] * stride_dh_m + cols2[None, :], d_h, mask=mask2)
    db = tl.reshape(tl.join(tl.sum(db_gate, axis=0), tl.sum(db_up, axis=0)), [2 * BLOCK_N])
    tl.store(db1_ptr + e.to(tl.int64) * stride_db1_e + cols2, db.to(db1_ptr.dtype.element_ty), mask=col_mask2)


@triton.jit
def _down_bias_bwd_tile(
    g_ptr, b2_ptr, weights_ptr, sorted_slots_ptr, dsp_ptr, db2_ptr,
    e, row_start, row_end, n_block, dsp_row, num_rows, hidden, topk,
    stride_g_t, stride_b2_e, stride_db2_e,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr,
):
    """Columns [n, n+BLOCK_N) of H over every row of expert e: db2[e] = Σ w·dY[t] and the
    ⟨dY[t], b2[e]⟩ part of the routing-weight gradient."""
    cols = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < hidden
    b = tl.load(b2_ptr + e.to(tl.int64) * stride_b2_e + cols, mask=col_mask, other=0.0).to(tl.float32)
    db = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # summed over rows after the loop, as in _act_bwd_tile
    for m0 in tl.range(row_start, row_end, BLOCK_M, num_stages=STAGES):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        slots = tl.load(sorted_slots_ptr + rows, mask=row_mask, other=0)
        w = tl.load(weights_ptr + slots, mask=row_mask, other=0.0).to(tl.float32)
        tokens = (slots // topk).to(tl.int64)
        mask = row_mask[:, None] & col_mask[None, :]
        g = tl.load(g_ptr + tokens[:, None] * stride_g_t + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        db += g * w[:, None]
        tl.store(dsp_ptr + dsp_row.to(tl.int64) * num_rows + slots, tl.sum(g * b[None, :], axis=1), mask=row_mask)
    tl.store(db2_ptr + e.to(tl.int64) * stride_db2_e + cols, tl.sum(db, axis=0).to(db2_ptr.dtype.element_ty),
             mask=col_mask)


@triton.jit
def gptoss_bwd_kernel(
    # Pointers --------------------------------------------------------------------------------
    d_act_ptr,  # (M, I) expert order: dY[slot // k]·W2[e]ᵀ, the unweighted gradient of A
    d_lora_ptr,  # (M, I) expert order, LORA: w·P·A2, the down LoRA's part of dA
    p_ptr,  # (M, r) expert order, LORA: P = dY[slot // k]·B̃2
    l2_ptr,  # (M, r) expert order, LORA: L2 = A·A2ᵀ (the forward's)
    h_ptr,  # (M, 2I) expert order: the forward's X·W1[e] without bias, interleaved
    b1_ptr,  # (E, 2I)
    g_ptr,  # (T, H): dY, the gradient of the block's output
    b2_ptr,  # (E, H)
    weights_ptr,  # (M,) routing weight of each token slot
    sorted_slots_ptr,  # (M,) int32
    expert_offsets_ptr,  # (E + 1,) int32
    d_h_ptr,  # (M, 2I) expert order: dH, interleaved (the up dx and dW operand)
    weighted_act_ptr,  # (M, I) expert order: w·A (the down dW operand)
    dsp_ptr,  # (⌈I/BLOCK_N⌉ + ⌈H/BLOCK_N⌉, M) float32: routing-weight gradient partials
    db1_ptr,  # (E, 2I)
    db2_ptr,  # (E, H)
    # Sizes -------------------------------------------------------------------------------------
    num_rows,  # M
    inter,  # I
    hidden,  # H
    topk,  # k
    rank,  # r of the down LoRA (LORA)
    limit,
    alpha,
    # Strides -----------------------------------------------------------------------------------
    stride_da_m, stride_dl_m, stride_p_m, stride_l2_m, stride_h_m, stride_b1_e, stride_g_t, stride_b2_e,
    stride_dh_m, stride_wa_m, stride_db1_e, stride_db2_e,
    # Meta-parameters ---------------------------------------------------------------------------
    I_BLOCKS: tl.constexpr,  # ⌈I / BLOCK_N⌉: programs along dim 0 below it do the activation
    LORA: tl.constexpr,  # the down projection carries LoRA (d_lora, P, L2 are read)
    BLOCK_M: tl.constexpr,  # rows per step of an activation program's loop over its expert
    BLOCK_N: tl.constexpr,  # columns of I per activation program
    DB2_BLOCK_M: tl.constexpr,  # the same for the down-bias programs, over columns of H: with no H or
    DB2_BLOCK_N: tl.constexpr,  # dA tiles they hold few registers, and take larger steps of gathered rows
    BLOCK_R: tl.constexpr,  # ≥ rank, a power of two ≥ 16
    STAGES: tl.constexpr,  # rows loop's software pipeline: 2+ fetches the next steps' row indices (and, with
    #                      TMA, their dA and H tiles) ahead
    TMA: tl.constexpr,  # dA and H read through tensor descriptors (16-byte aligned rows)
    PACKED: tl.constexpr,  # 16-bit activations: h_ptr, d_h_ptr are int32 views [M, I], one (gate, up) pair a word
):
    """Grid: (I_BLOCKS + ⌈H / DB2_BLOCK_N⌉ (or just I_BLOCKS when neither db2 nor the routing-weight
    gradient is wanted), E). Each program owns one expert and one column block and walks the
    expert's rows, so both bias gradients are plain register sums per expert: deterministic, no
    atomics, and an empty expert stores zeros. Programs below I_BLOCKS run the activation's
    backward; the rest the down bias's. One launch for both keeps a launch's host time off the
    block (the eager step at a few thousand tokens is host-bound)."""
    limit, alpha = _as_float32(limit), _as_float32(alpha)
    pid_n = tl.program_id(0)
    e = tl.program_id(1)
    row_start = tl.load(expert_offsets_ptr + e)
    row_end = tl.load(expert_offsets_ptr + e + 1)
    if pid_n < I_BLOCKS:
        _act_bwd_tile(d_act_ptr, d_lora_ptr, p_ptr, l2_ptr, h_ptr, b1_ptr, weights_ptr, sorted_slots_ptr, d_h_ptr,
                      weighted_act_ptr, dsp_ptr, db1_ptr, e, row_start, row_end, pid_n, num_rows, inter, rank,
                      limit, alpha, stride_da_m, stride_dl_m, stride_p_m, stride_l2_m, stride_h_m, stride_b1_e,
                      stride_dh_m, stride_wa_m, stride_db1_e, LORA, BLOCK_M, BLOCK_N, BLOCK_R, STAGES, TMA, PACKED)
    else:
        _down_bias_bwd_tile(g_ptr, b2_ptr, weights_ptr, sorted_slots_ptr, dsp_ptr, db2_ptr,
                            e, row_start, row_end, pid_n - I_BLOCKS, pid_n, num_rows, hidden, topk,
                            stride_g_t, stride_b2_e, stride_db2_e, DB2_BLOCK_M, DB2_BLOCK_N, STAGES)
