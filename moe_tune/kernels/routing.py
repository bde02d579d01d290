"""Triton kernel for the routing metadata of the grouped-GEMM kernels: a stable counting sort of
the token slots by expert id, in one launch.

From the flattened top-k expert ids ``ids[M]`` (slot ``s = t·k + j`` holds ``top_k_index[t, j]``):

* ``expert_offsets[e]`` = how many ids are below e (``expert_offsets[E]`` = M);
* ``sorted_slots[expert_offsets[e] + r]`` = the slot of the r-th id equal to e, in slot order.

One program per expert id plus one for the end offset; each streams the whole id vector twice
(count, then place), which at M = 131072 is 1 MiB per pass out of L2. One launch instead of a
radix sort's several plus a searchsorted: the block's eager host time is mostly launches.
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
