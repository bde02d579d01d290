"""Routing metadata for the grouped-GEMM kernels, built on the device with no host sync.

From the router's top-k expert ids ``[T, k]`` to:

* ``expert_offsets`` ``[E+1]`` int32 — rows of expert e are ``[offs[e], offs[e+1])`` in
  expert order (``offs[1:]`` is what ``torch._grouped_mm`` calls ``offs``);
* ``sorted_slots`` ``[M]`` int32 — the token-slot id ``t·k + j`` of each expert-ordered row
  (stable, so rows of one expert stay in token order).

Three ways to the same result (``build_routing``'s ``method``):

* ``"kernel"`` — one launch of ``moe_tune.kernels.routing.routing_kernel``, a counting sort with
  one program per expert, each reading every id: up to ``KERNEL_MAX_IDS`` ids (and
  ``KERNEL_MAX_WORK`` ids × experts), the token counts where the eager block is bound by host
  time and one launch beats two;
* ``"chunks"`` — above it on the GPU: the same counting sort over chunks of ids in two launches
  (``routing_count_kernel``, ``routing_place_kernel``), each id read twice whatever the number of
  experts;
* ``"sort"`` — plain CPU tensors (a reference, a test): one stable ``torch.sort`` and a
  ``searchsorted``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moe_tune.device import interpreting
from moe_tune.errors import InvalidInputError
from moe_tune.kernels.routing import block_table_kernel, routing_count_kernel, routing_kernel, routing_place_kernel

# Up to these ids, and ids × experts, one launch of the per-expert kernel; above, the chunked one.
# H200, GPU time (benchmarks/gpu_routing_probe.py): 128 experts × 16384 ids, 9.3 µs against the
# chunks' 7.1 in two launches; × 32768 ids 17.7 against 8.6; × 131072 ids 65.8 against 17.8; 512
# experts × 20480 ids 61.8 against 11.0.
KERNEL_MAX_IDS = 16384
KERNEL_MAX_WORK = 1 << 21


def _routing_launch(num_ids) -> dict:
    """The kernel's chunk and warps: the whole id vector in one chunk up to 16384 ids, 8 warps.
    Fewer, wider chunks shorten each program's serial walk: 49 → 22 µs at 4096 tokens × top-8 × 128
    experts against 1024-id chunks at 4 warps, 93 → 41 µs at 8192 (H200). Under torch.compile
    the id count may be symbolic: its example value picks the chunk (``launch.size_hint``)."""
    from moe_tune.ops.launch import size_hint

    block = 1 << max(10, min(14, (max(size_hint(num_ids), 1) - 1).bit_length()))
    return dict(BLOCK=block, num_warps=8)


def _chunks_launch(num_ids, num_experts: int) -> tuple[dict, dict]:
    """The chunked kernels' meta-parameters (count, place), 4 warps. Each program sorts its chunk
    in registers (a sort of 2048 ids took ~30 µs, of 8192 ~170 on an H200), and the place kernel
    reads every chunk's counts, ``COUNT_ROWS`` rows at a time, so too many chunks cost there
    (256-id chunks: 70 µs at 131072 ids, 10 at 32768). Chunks of 512 ids up to 65536 ids, and up
    to 262144 with at most 64 experts; 1024 above, up to 262144; 2048 beyond. Measured (H200,
    µs, this rule's choice against the next best): 128 experts at 98304 ids 16.4 (512: 20.2), at
    196608 29.6 (2048: 38.2); 64 experts at 196608 19.1 (1024: 20.5); 512 experts at 163840 27.2
    (2048: 39.6)."""
    from moe_tune.ops.launch import next_power_of_2, size_hint

    ids = max(size_hint(num_ids), 1)
    if ids <= 65536 or (num_experts <= 64 and ids <= 262144):
        chunk = 512
    else:
        chunk = 1024 if ids <= 262144 else 2048
    e_pow2 = next_power_of_2(num_experts)
    count = dict(E_POW2=e_pow2, CHUNK=chunk, num_warps=4)
    return count, dict(E_POW2=e_pow2, CHUNK=chunk, COUNT_ROWS=max(1, 4096 // e_pow2), num_warps=4)


@dataclass(frozen=True)
class Routing:
    expert_offsets: torch.Tensor  # (E + 1,) int32
    sorted_slots: torch.Tensor  # (M,) int32
    num_tokens: int
    topk: int
    # BLOCK_M → the row-block table of a warp-specialised launch (``block_table``), built once
    _tables: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def num_experts(self) -> int:
        return self.expert_offsets.numel() - 1

    def block_table(self, block_m: int, *, in_op: bool = False) -> torch.Tensor:
        """int32 ``[1 + 2·(⌊M / block_m⌋ + E)]``: the number of row blocks of ``block_m`` rows,
        then (expert, first row) of each (``moe_tune.kernels.routing.block_table_kernel``): what a
        warp-specialised grouped GEMM walks. One launch per BLOCK_M per routing; no host sync."""
        table = self._tables.get(block_m)
        if table is None:
            from moe_tune.ops.launch import cdiv, launch_kernel, next_power_of_2

            E = self.num_experts
            e_pow2 = next_power_of_2(E + 1)
            max_blocks = self.num_rows // block_m + E
            table = torch.empty(1 + 2 * max_blocks, dtype=torch.int32, device=self.expert_offsets.device)
            chunk = max(16, 2048 // e_pow2)  # a [chunk, E_POW2] comparison per program
            meta = dict(E=E, E_POW2=e_pow2, BLOCK_M=block_m, CHUNK=chunk, num_warps=4)
            launch_kernel(block_table_kernel, in_op, (cdiv(max_blocks, chunk),),
                          (self.expert_offsets, table, max_blocks), meta, (table,))
            self._tables[block_m] = table
        return table

    @property
    def num_rows(self) -> int:
        return self.sorted_slots.numel()


def check_routing_args(top_k_index, top_k_weights, num_tokens: int, num_experts: int) -> None:
    """The router's outputs as the experts blocks take them: ``top_k_index`` [T, k] int32/int64
    with 1 ≤ k ≤ E, ``top_k_weights`` [T, k]; ``InvalidInputError`` saying what is wrong."""
    T, E = num_tokens, num_experts
    if top_k_index.dim() != 2 or top_k_index.shape[0] != T:
        raise InvalidInputError(f"top_k_index must be [T, k] with T={T}, got shape {list(top_k_index.shape)}")
    if top_k_index.dtype not in (torch.int32, torch.int64):
        raise InvalidInputError(f"top_k_index must be int32 or int64, got {top_k_index.dtype}")
    k = top_k_index.shape[1]
    if not 1 <= k <= E:
        raise InvalidInputError(f"top-k must be between 1 and the number of experts ({E}), got {k}")
    if tuple(top_k_weights.shape) != (T, k):
        raise InvalidInputError(f"top_k_weights must be [T, k] = {[T, k]}, got {list(top_k_weights.shape)}")


def build_routing(top_k_index: torch.Tensor, num_experts: int, *, in_op: bool = False,
                  method: str | None = None) -> Routing:
    """Sort token slots by expert. Shapes only are read on the host; no ``.item()``.

    ``in_op``: called from a torch.library op body (see ``moe_tune.ops.launch``). ``method``:
    ``"kernel"``, ``"chunks"`` or ``"sort"`` to force one way (tests, probes); by default the
    module's rule."""
    if top_k_index.dim() != 2:
        raise InvalidInputError(f"top_k_index must be [T, k], got shape {tuple(top_k_index.shape)}")
    if top_k_index.dtype not in (torch.int32, torch.int64):
        raise InvalidInputError(f"top_k_index must be int32 or int64, got {top_k_index.dtype}")
    if num_experts <= 0:
        raise InvalidInputError(f"num_experts must be positive, got {num_experts}")
    num_tokens, topk = top_k_index.shape
    ids = top_k_index.reshape(-1)
    M = ids.numel()
    if method is None:
        if not (ids.is_cuda or interpreting()):  # plain CPU tensors (a reference, a test)
            method = "sort"
        else:
            method = "kernel" if M <= KERNEL_MAX_IDS and M * num_experts <= KERNEL_MAX_WORK else "chunks"
    if method not in ("kernel", "chunks", "sort"):
        raise InvalidInputError(f"method must be 'kernel', 'chunks' or 'sort', got {method!r}")
    if method != "sort":
        from moe_tune.ops.launch import cdiv, launch_kernel

        offsets = torch.empty(num_experts + 1, dtype=torch.int32, device=ids.device)
        slots = torch.empty(M, dtype=torch.int32, device=ids.device)
        if method == "kernel" or M == 0:
            launch_kernel(routing_kernel, in_op, (num_experts + 1,), (ids, offsets, slots, M),
                          _routing_launch(M), (offsets, slots))
        else:
            count, place = _chunks_launch(M, num_experts)
            chunks = cdiv(M, count["CHUNK"])
            scratch = torch.empty((2, chunks, count["E_POW2"]), dtype=torch.int32, device=ids.device)
            launch_kernel(routing_count_kernel, in_op, (chunks,), (ids, scratch[0], M, num_experts), count,
                          (scratch,))
            launch_kernel(routing_place_kernel, in_op, (chunks,),
                          (ids, scratch[0], scratch[1], offsets, slots, M, chunks, num_experts), place,
                          (offsets, slots))
        return Routing(offsets, slots, num_tokens, topk)
    # One stable sort gives both outputs: its permutation is the slot order, and the offsets are
    # where each expert id would be inserted in the sorted ids (a handful of launches in all,
    # where a histogram and a cumsum took six).
    sorted_ids, order = torch.sort(ids, stable=True)
    experts = torch.arange(num_experts + 1, dtype=sorted_ids.dtype, device=sorted_ids.device)
    offsets = torch.searchsorted(sorted_ids, experts, out_int32=True)
    return Routing(offsets, order.to(torch.int32), num_tokens, topk)


def random_routing(num_tokens: int, num_experts: int, topk: int, *, device=None, generator=None,
                   skew: float = 0.0) -> torch.Tensor:
    """Top-k expert ids from random router logits (``skew`` > 0 biases towards low expert ids,
    Zipf-like, to mimic an unbalanced router). Returns ``[T, k]`` int64."""
    logits = torch.randn(num_tokens, num_experts, device=device, generator=generator)
    if skew:
        ranks = torch.arange(1, num_experts + 1, device=logits.device, dtype=logits.dtype)
        logits = logits - skew * torch.log(ranks)
    return torch.topk(logits, topk, dim=-1).indices
