"""Triton kernels for the routing metadata of the grouped-GEMM kernels: a stable counting sort of
the token slots by expert id.

From the flattened top-k expert ids ``ids[M]`` (slot ``s = t·k + j`` holds ``top_k_index[t, j]``):

* ``expert_offsets[e]`` = how many ids are below e (``expert_offsets[E]`` = M);
* ``sorted_slots[expert_offsets[e] + r]`` = the slot of the r-th id equal to e, in slot order.

Two ways (``moe_tune.ops.routing`` picks by size):

* ``routing_kernel``, one launch: one program per expert id plus one for the end offset; each
  streams the whole id vector twice (count, then place). At a few thousand ids, where the eager
  block is bound by host time, one launch beats several; but its work grows as ids × experts
  (75 µs at 131072 ids × 128 experts on an H200).
* ``routing_count_kernel`` then ``routing_place_kernel``, the ids in chunks: a histogram per
  chunk, then each chunk's ids sorted in registers and placed after the rows of lower experts and
  of earlier chunks. Each id is read twice in all, whatever the number of experts.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def routing_kernel(
    ids_ptr,  # (M,) int32 or int64: the expert id of each token slot
    offsets_ptr,  # (E + 1,) int32 out
    slots_ptr,  # (M,) int32 out
    num_rows,  # M
    BLOCK: tl.constexpr,
):
    """Grid: (E + 1,). Program e writes expert_offsets[e] and the slots of expert e."""
    e = tl.program_id(0)
    lanes = tl.arange(0, BLOCK)

    # -- Pass 1: the expert's first row is the number of ids below it ----------------------------
    below = tl.zeros((BLOCK,), dtype=tl.int32)
    for m0 in range(0, num_rows, BLOCK):
        rows = m0 + lanes
        ids = tl.load(ids_ptr + rows, mask=rows < num_rows, other=e)
        below += (ids < e).to(tl.int32)
    first = tl.sum(below, axis=0)
    tl.store(offsets_ptr + e, first)

    # -- Pass 2: place the expert's slots in slot order (a running rank over the chunks) ---------
    placed = first
    for m0 in range(0, num_rows, BLOCK):
        rows = m0 + lanes
        mine = tl.load(ids_ptr + rows, mask=rows < num_rows, other=-1) == e
        rank = tl.cumsum(mine.to(tl.int32), axis=0)
        tl.store(slots_ptr + placed + rank - 1, rows.to(tl.int32), mask=mine)
        placed += tl.sum(mine.to(tl.int32), axis=0)


@triton.jit
def routing_count_kernel(
    ids_ptr,  # (M,) int32 or int64: the expert id of each token slot
    counts_ptr,  # (C, E_POW2) int32 out: ids of each expert in each chunk of CHUNK slots
    num_rows,  # M
    E,
    E_POW2: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """Grid: (C = ⌈M / CHUNK⌉,). The first launch of the chunked counting sort: one histogram a
    chunk. Ids outside [0, E) are counted nowhere."""
    c = tl.program_id(0)
    rows = c * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(ids_ptr + rows, mask=rows < num_rows, other=-1).to(tl.int32)
    counts = tl.histogram(ids, E_POW2, mask=(rows < num_rows) & (ids >= 0) & (ids < E))
    tl.store(counts_ptr + c * E_POW2 + tl.arange(0, E_POW2), counts)


@triton.jit
def routing_place_kernel(
    ids_ptr,  # (M,) int32 or int64
    counts_ptr,  # (C, E_POW2) int32: ``routing_count_kernel``'s
    shifts_ptr,  # (C, E_POW2) int32 scratch: each program's own row
    offsets_ptr,  # (E + 1,) int32 out
    slots_ptr,  # (M,) int32 out
    num_rows,  # M
    num_chunks,  # C
    E,
    E_POW2: tl.constexpr,
    CHUNK: tl.constexpr,
    COUNT_ROWS: tl.constexpr,  # chunks' counts read at once
):
    """Grid: (C,). The second launch: program c places its chunk's slots. An id's row is the number
    of ids of lower experts (every chunk), plus those of its expert in earlier chunks, plus its
    rank among its expert's ids in this chunk: the chunk sorted by (id, slot) gives that rank as
    its position minus the position of the expert's first id. Program 0 writes the offsets."""
    c = tl.program_id(0)
    experts = tl.arange(0, E_POW2)
    totals = tl.zeros((E_POW2,), dtype=tl.int32)
    earlier = tl.zeros((E_POW2,), dtype=tl.int32)
    own = tl.zeros((E_POW2,), dtype=tl.int32)
    for c0 in range(0, num_chunks, COUNT_ROWS):
        chunks = c0 + tl.arange(0, COUNT_ROWS)
        counts = tl.load(counts_ptr + chunks[:, None] * E_POW2 + experts[None, :],
                         mask=(chunks < num_chunks)[:, None], other=0)
        totals += tl.sum(counts, axis=0)
        earlier += tl.sum(tl.where((chunks < c)[:, None], counts, 0), axis=0)
        own += tl.sum(tl.where((chunks == c)[:, None], counts, 0), axis=0)
    first = tl.cumsum(totals, axis=0) - totals  # each expert's first row
    if c == 0:
        tl.store(offsets_ptr + experts, first, mask=experts < E)
        tl.store(offsets_ptr + E, tl.sum(totals, axis=0))
    # row of the chunk's j-th id in (id, slot) order = shift[its id] + j
    shift = first + earlier - (tl.cumsum(own, axis=0) - own)
    tl.store(shifts_ptr + c * E_POW2 + experts, shift)
    tl.debug_barrier()  # the row written above is read back below by other threads of the program

    lanes = tl.arange(0, CHUNK)
    rows = c * CHUNK + lanes
    ids = tl.load(ids_ptr + rows, mask=rows < num_rows, other=-1).to(tl.int32)
    valid = (rows < num_rows) & (ids >= 0) & (ids < E)
    keys = tl.sort(tl.where(valid, ids, E_POW2) * CHUNK + lanes)  # ids outside [0, E) sort last
    expert = keys // CHUNK
    placed = expert < E
    row = tl.load(shifts_ptr + c * E_POW2 + expert, mask=placed, other=0) + lanes
    tl.store(slots_ptr + row, c * CHUNK + keys % CHUNK, mask=placed)


@triton.jit
def block_table_kernel(
    offsets_ptr,  # (E + 1,) int32: the routing's expert offsets
    table_ptr,  # (1 + 2·max_blocks,) int32 out
    max_blocks,  # ⌊M / BLOCK_M⌋ + E: no routing has more row blocks
    E: tl.constexpr,
    E_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """Grid: (⌈max_blocks / CHUNK⌉,). The row blocks of BLOCK_M rows the grouped-GEMM kernel walks,
    as a table: ``table[0]`` = their number, then per block (expert, first row). A warp-specialised
    ``grouped_mm_kernel`` reads it in place of its in-register search (a reduction, which Triton's
    Hopper warp specialisation cannot follow). Each program fills CHUNK blocks' entries (each works
    out the per-expert block counts itself: E values); one program looping over every chunk took
    19-25 µs on an H200 (Nsight Compute, gpt-oss at 4096 tokens), the forward's serial head. Entries
    past the count are left as they are."""
    e_range = tl.arange(0, E_POW2)
    starts = tl.load(offsets_ptr + e_range, mask=e_range < E, other=0)
    ends = tl.load(offsets_ptr + e_range + 1, mask=e_range < E, other=0)
    blocks = tl.cdiv(ends - starts, BLOCK_M)
    cum_end = tl.cumsum(blocks, axis=0)  # blocks of experts ≤ e
    first = cum_end - blocks
    num_blocks = tl.sum(blocks, axis=0)
    pid = tl.program_id(0)
    if pid == 0:
        tl.store(table_ptr, num_blocks)
    b = pid * CHUNK + tl.arange(0, CHUNK)
    # The expert of block b: how many experts end at or before it.
    e = tl.sum((cum_end[None, :] <= b[:, None]).to(tl.int32), axis=1)
    mine = e_range[None, :] == e[:, None]
    row0 = (tl.sum(tl.where(mine, starts[None, :], 0), axis=1)
            + (b - tl.sum(tl.where(mine, first[None, :], 0), axis=1)) * BLOCK_M)
    keep = (b < num_blocks) & (b < max_blocks)
    tl.store(table_ptr + 1 + 2 * b, e, mask=keep)
    tl.store(table_ptr + 2 + 2 * b, row0, mask=keep)
