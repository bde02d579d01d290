"""Triton kernel for the routing metadata of the grouped-GEMM kernels: a stable counting sort of
the token slots by expert id, in one launch.

From the flattened top-k expert ids ``ids[M]`` (slot ``s = t·k + j`` holds ``top_k_index[t, j]``):

* ``expert_offsets[e]`` = how many ids are below e (``expert_offsets[E]`` = M);
* ``sorted_slots[expert_offsets[e] + r]`` = the slot of the r-th id equal to e, in slot order.

One program per expert id plus one for the end offset; each streams the whole id vector twice
(count, then place) in chunks of BLOCK ids, which at M = 131072 is 1 MiB per pass out of L2. One
launch instead of a radix sort's several plus a searchsorted: the block's eager host time is
mostly launches, and at 131072 ids × 128 experts the kernel took 75 µs against the sort's 121 (H200).
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
