"""Launchers of ``moe_tune.kernels.rows``: the k-slot sum and the row gather around the experts
block's grouped GEMMs, and the bound copies of a graphed block. Callers validate (the block's
bodies); nothing here reads device memory on the host, so all run under CUDA-graph capture and
inside torch.library op bodies.
"""

from __future__ import annotations

import torch

from moe_tune.kernels.rows import copy_kernel, gather_rows_kernel, slot_sum_kernel
from moe_tune.ops import launch

# Elements per program and warps: 16 per thread at 4 warps (two 16-byte loads of bf16 per slot
# row), a W chunk of at most 512 columns. (tile elements, widest W chunk, num_warps)
ROWS_TILE = (2048, 512, 4)
COPY_TILE = (4096, 4)  # (elements per program, num_warps)


def _launch(kernel, in_op: bool, num_rows, width, tile: tuple[int, int, int], rows_name: str, args: tuple,
            meta: dict, outputs: tuple) -> None:
    """One launch over [num_rows, width] in tiles of ``tile``; the kernel's row block is the
    constexpr ``rows_name``. Nothing to launch for an empty output."""
    if num_rows == 0 or width == 0:
        return
    elements, widest, warps = tile
    block_w = min(launch.next_power_of_2(width), widest)
    block_rows = max(1, elements // block_w)
    launch.launch_kernel(kernel, in_op, (launch.cdiv(num_rows, block_rows), launch.cdiv(width, block_w)), args,
                         {**meta, rows_name: block_rows, "BLOCK_W": block_w, "num_warps": warps}, outputs)


def slot_sum(rows: torch.Tensor, topk: int, out: torch.Tensor | None = None, *, accumulate: bool = False,
             in_op: bool = False, tile: tuple[int, int, int] = ROWS_TILE) -> torch.Tensor:
    """``out[t] = Σ_j rows[t·k + j]`` for ``rows`` [T·k, W] in slot order, both contiguous along W
    (``accumulate``: added to ``out``); float32 accumulation, one rounding to ``out``'s dtype.
    Returns ``out``."""
    M, W = rows.shape
    T = M // topk
    if out is None:
        out = torch.empty((T, W), dtype=rows.dtype, device=rows.device)
    _launch(slot_sum_kernel, in_op, T, W, tile, "BLOCK_T", (rows, out, T, W, rows.stride(0), out.stride(0)),
            dict(TOPK=topk, ACCUMULATE=accumulate), (rows, out))
    return out


def gather_rows(src: torch.Tensor, slots: torch.Tensor, div: int, out: torch.Tensor | None = None, *,
                in_op: bool = False, tile: tuple[int, int, int] = ROWS_TILE) -> torch.Tensor:
    """``out[r] = src[slots[r] // div]`` ([R, W]; ``slots`` int32 [R]; ``src`` of any strides).
    Returns ``out``."""
    R, W = slots.shape[0], src.shape[1]
    if out is None:
        out = torch.empty((R, W), dtype=src.dtype, device=src.device)
    _launch(gather_rows_kernel, in_op, R, W, tile, "BLOCK_R",
            (src, slots, out, R, W, div, src.stride(0), src.stride(1), out.stride(0)), {}, (src, out))
    return out


def bind_copies(sources: tuple[torch.Tensor, ...], destinations: tuple[torch.Tensor, ...], bind: str,
                tile: tuple[int, int] = COPY_TILE) -> launch.BoundLaunch:
    """Up to three copies ``destinations[i] ← sources[i]`` (contiguous, each pair alike in shape and
    dtype) as one ``launch.BoundLaunch`` of ``copy_kernel``. ``bind="sources"``: each call passes
    new sources and the destinations are fixed (a graph's static inputs); ``"destinations"``: the
    reverse (fresh tensors out of a graph's static outputs). The bound tensors are kept."""
    if not 1 <= len(sources) == len(destinations) <= 3:
        raise ValueError("bind_copies takes one to three (source, destination) pairs")
    if bind not in ("sources", "destinations"):
        raise ValueError(f"bind must be 'sources' or 'destinations', got {bind!r}")
    elements, warps = tile
    pairs = list(zip(sources, destinations))
    sizes = [src.numel() for src in sources] + [0] * (3 - len(pairs))
    pairs += [pairs[0]] * (3 - len(pairs))  # copies of no elements (the kernel reads no pointer of theirs)
    args = tuple(x for (src, dst), n in zip(pairs, sizes) for x in (src, dst, n))
    grid = (sum(launch.cdiv(n, elements) for n in sizes),)
    first = 0 if bind == "sources" else 1
    slots = tuple(first + 3 * i for i in range(len(sources)))
    return launch.BoundLaunch(copy_kernel, grid, args, dict(BLOCK=elements, num_warps=warps), slots, None)
