"""The kernel config space and its pruning rules, as data plus named predicates.

Everything that decides whether a ``KernelConfig`` can run a ``Problem`` on a device lives here:
the launchers call ``check_config`` (a clear ``ConfigError`` instead of a Triton failure), the
runtime loader calls ``default_config`` (the heuristic fallback, picked by rule from the device's
shared memory), and the tuner enumerates ``candidates``. Pure Python: no torch, no triton.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Callable, Iterator

from moe_tune.device import DeviceInfo
from moe_tune.errors import ConfigError
from moe_tune.problem import DTYPE_BYTES, KernelConfig, Problem

# Search spaces by name. `quick` screens in seconds, `default` is what `moe-tune sweep` runs,
# `full` is the exhaustive reference the fast search is checked against, `interpret` is for
# Triton's CPU interpreter (tests).
SPACES: dict[str, dict[str, tuple]] = {
    "quick": {
        "BLOCK_M": (64, 128),
        "BLOCK_N": (64, 128),
        "BLOCK_K": (64,),
        "GROUP_M": (8,),
        "num_warps": (4, 8),
        "num_stages": (3, 4),
        "TMA_LOAD": (False, True),
        "TMA_STORE": (False,),
        "GATHER_COPY": (False,),
        "WARP_SPEC": (False,),
    },
    "default": {
        "BLOCK_M": (32, 64, 128),  # 32: a dW's reduction step (two programs per SM fit with it)
        "BLOCK_N": (64, 128, 256),
        "BLOCK_K": (32, 64, 128),
        "GROUP_M": (8,),
        "num_warps": (4, 8),
        "num_stages": (3, 4, 5),
        "TMA_LOAD": (False, True),
        "TMA_STORE": (False, True),
        "GATHER_COPY": (False, True),
        "WARP_SPEC": (False, True),
        "PROGRAMS_PER_SM": (1, 2),
    },
    "full": {
        "BLOCK_M": (16, 32, 64, 128, 256),
        "BLOCK_N": (32, 64, 128, 256),
        "BLOCK_K": (32, 64, 128, 256),
        "GROUP_M": (1, 4, 8, 16),
        "num_warps": (4, 8),
        "num_stages": (2, 3, 4, 5, 6),
        "TMA_LOAD": (False, True),
        "TMA_STORE": (False, True),
        "GATHER_COPY": (False, True),
        "WARP_SPEC": (False, True),
        "PROGRAMS_PER_SM": (1, 2),
    },
    # What `moe-tune sweep --interpret` searches: blocks the tiny test preset (E=4, H=64, I=32)
    # admits, one warp so that 16x32 tiles pass `warps_fit_tile`. The interpreter ignores warps
    # and stages; the tilings and the TMA paths are what differ.
    "interpret": {
        "BLOCK_M": (16, 32),
        "BLOCK_N": (32,),
        "BLOCK_K": (16, 32),
        "GROUP_M": (4,),
        "num_warps": (1,),
        "num_stages": (1,),
        "TMA_LOAD": (False, True),
        "TMA_STORE": (False, True),
        "GATHER_COPY": (False,),  # tests/ops covers the copy; keeps the CI sweep small
        "WARP_SPEC": (False,),  # needs four warps; tests/ops covers it
    },
}

# Bytes the compiler keeps beside the pipelined operand buffers (barriers, layout conversion
# scratch); measured kernels on H100 sit a few KiB above stages·BK·(BM+BN)·bytes.
_SMEM_SLACK = 4096


def tile_dims(problem: Problem, cfg: KernelConfig) -> tuple[int, int, int]:
    """(rows of A per stage, columns of B per stage, reduction per stage) in elements, i.e. the
    two operand tiles are [a_rows, red] and [red, b_cols] for forward/dx, [red, a_rows] and
    [red, b_cols] for dw (the reduction runs over the expert's rows there)."""
    if problem.pass_ == "dw":
        return cfg.BLOCK_N, cfg.BLOCK_K, cfg.BLOCK_M
    return cfg.BLOCK_M, cfg.BLOCK_N, cfg.BLOCK_K


def output_tile(problem: Problem, cfg: KernelConfig) -> tuple[int, int]:
    return (cfg.BLOCK_N, cfg.BLOCK_K) if problem.pass_ == "dw" else (cfg.BLOCK_M, cfg.BLOCK_N)


def accumulator_regs(rows: int, cols: int, num_warps: int) -> float:
    """fp32 accumulator registers a thread holds for a rows×cols output tile over ``num_warps`` warps."""
    return rows * cols / (32 * num_warps)


def shared_mem_bytes(problem: Problem, cfg: KernelConfig) -> int:
    """Estimated shared memory: stages·red·(a_rows+b_cols)·bytes, plus the output tile when it is
    staged through shared memory for a TMA store."""
    nbytes = DTYPE_BYTES[problem.dtype]
    a_rows, b_cols, red = tile_dims(problem, cfg)
    total = cfg.num_stages * red * (a_rows + b_cols) * nbytes + _SMEM_SLACK
    if cfg.TMA_STORE:
        rows, cols = output_tile(problem, cfg)
        total += rows * cols * nbytes
    return total


def output_dims(problem: Problem) -> tuple[str, int, str, int]:
    """(name, size) of the output columns and of the reduction for forward/dx."""
    if problem.pass_ == "dx":
        return "K", problem.K, "N", problem.N
    return "N", problem.N, "K", problem.K


def output_scattered(problem: Problem) -> bool:
    """Whether the pass writes rows in token-slot order (never possible through TMA)."""
    if problem.pass_ == "forward":
        return problem.scatter
    if problem.pass_ == "dx":
        return problem.gather
    return False


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# ---------------------------------------------------------------------------------------------
# Named predicates: each returns None when the config is fine, else the reason it is not.
# ---------------------------------------------------------------------------------------------

Predicate = Callable[[Problem, KernelConfig, DeviceInfo], "str | None"]


def fits_shared_memory(problem: Problem, cfg: KernelConfig, device: DeviceInfo) -> str | None:
    need = shared_mem_bytes(problem, cfg)
    if need > device.max_shared_mem:
        return f"needs ~{need} bytes of shared memory, the device has {device.max_shared_mem}"
    return None


def tma_supported(problem: Problem, cfg: KernelConfig, device: DeviceInfo) -> str | None:
    if (cfg.TMA_LOAD or cfg.TMA_STORE) and not device.supports_tma:
        return f"TMA needs compute capability 9.0+, {device.name} is {device.capability[0]}.{device.capability[1]}"
    return None


def tma_aligned(problem: Problem, cfg: KernelConfig, device: DeviceInfo) -> str | None:
    # Tensor descriptors need 16-byte aligned row strides; rows are N or K elements long.
    if cfg.TMA_LOAD or cfg.TMA_STORE:
        nbytes = DTYPE_BYTES[problem.dtype]
        for name, size in (("N", problem.N), ("K", problem.K)):
            if size * nbytes % 16:
                return f"TMA needs 16-byte row strides; {name}={size} {problem.dtype} rows are {size * nbytes} bytes"
    return None


def tma_store_possible(problem: Problem, cfg: KernelConfig, device: DeviceInfo) -> str | None:
    if cfg.TMA_STORE and output_scattered(problem):
        return "TMA_STORE cannot write scattered rows (this pass writes in token-slot order)"
    return None


def a_gathered(problem: Problem) -> bool:
    """Whether a forward or dx pass reads its A rows gathered (in token or slot order)."""
    return problem.gather if problem.pass_ == "forward" else problem.scatter if problem.pass_ == "dx" else False


def gather_copy_applies(problem: Problem, cfg: KernelConfig, device: DeviceInfo) -> str | None:
    """GATHER_COPY copies a gathered operand to expert order before the kernel: either of a dW's,
    or the A rows of a forward or dx (not with a fused row copy of its own)."""
    if not cfg.GATHER_COPY:
        return None
    if problem.pass_ == "dw":
        applies = (problem.gather or problem.scatter) and problem.fusion != "sorted"
    else:
        applies = a_gathered(problem) and problem.fusion == "none"
    return None if applies else "GATHER_COPY applies to a gathered operand only (dw's, or a forward's or dx's A rows)"


def warp_spec_possible(problem: Problem, cfg: KernelConfig, device: DeviceInfo) -> str | None:
    """What Triton 3.6's Hopper warp specialisation compiles and computes right (compiled for
    sm90 and checked on an H100 and an H200, 2026-11-28): a loop whose every load is a TMA copy,
    16-bit operands, four warps per consumer warpgroup, at most four stages, and a TMA store (with
    a pointer-store epilogue the kernel left its output unwritten; five stages did too). dW stores
    through a 2-D view of [E·N, K], so its tiles must not straddle two experts; a forward or dx
    needs 128+ rows a tile and no routing weight in its epilogue."""
    if not cfg.WARP_SPEC:
        return None
    if not (device.is_interpreter or device.capability[0] == 9):
        return "WARP_SPEC is Triton's Hopper (compute capability 9.x) warp specialisation"
    if problem.dtype not in ("bfloat16", "float16"):
        return "WARP_SPEC runs 16-bit operands only"
    if not (cfg.TMA_LOAD and cfg.TMA_STORE) or cfg.num_warps != 4 or cfg.num_stages > 4:
        return "WARP_SPEC needs TMA_LOAD, TMA_STORE, num_warps=4 (per consumer warpgroup) and at most 4 stages"
    if problem.pass_ == "dw":
        n = problem.K if problem.weight_layout == "kn" else problem.N  # dW's rows per expert
        if n % cfg.BLOCK_N:
            return f"WARP_SPEC dW needs BLOCK_N to divide the {n} rows of each expert's gradient"
        if (problem.gather or problem.scatter) and problem.fusion != "sorted" and not cfg.GATHER_COPY:
            return "WARP_SPEC dW needs both operands in expert order (fusion 'sorted' or GATHER_COPY)"
        return None
    if (a_gathered(problem) and not cfg.GATHER_COPY) or problem.fusion != "none":
        return "WARP_SPEC needs A in expert order (not gathered unless GATHER_COPY, no fused row copy)"
    if cfg.BLOCK_M < 128 and not device.is_interpreter:  # the interpreter runs any tile
        # The two consumer warpgroups split the tile's rows, and a Hopper MMA takes 64 rows: with 64
        # the pass fails to compile (every gathered-A problem swept on an H200, 2026-11-28).
        return "WARP_SPEC splits BLOCK_M over two consumer warpgroups of at least 64 rows: BLOCK_M >= 128"
    if problem.weighted:
        # The routing weight in the epilogue of a warp-specialised loop computes wrong values in
        # Triton 3.6 (relative error 0.48-0.67 for every such config on an H200, 2026-11-28).
        return "WARP_SPEC does not combine with the routing weight in the epilogue (Triton 3.6 computes it wrong)"
    return None


# Registers a thread of these kernels holds besides its fp32 accumulator (addresses, indices, the
# epilogue): the dW tilings of benchmarks/gpu_occupancy_probe.py compiled to 26-62 above it (sm90).
_REGS_BESIDE_ACCUMULATOR = 40
_REGS_PER_SM = 65536


def programs_fit_sm(problem: Problem, cfg: KernelConfig, device: DeviceInfo) -> str | None:
    """Several programs per SM only where they can stay resident together: shared memory and
    registers (the accumulator plus ``_REGS_BESIDE_ACCUMULATOR`` a thread) for all of them, and
    no warp specialisation (its warpgroups take an SM's registers). Elsewhere the extra programs
    would only queue behind the first (correct, never faster)."""
    n = cfg.PROGRAMS_PER_SM
    if n == 1:
        return None
    if cfg.WARP_SPEC:
        return "PROGRAMS_PER_SM > 1 does not combine with WARP_SPEC (its warpgroups take an SM's registers)"
    need = n * shared_mem_bytes(problem, cfg)
    if need > device.max_shared_mem:
        return f"{n} programs need ~{need} bytes of shared memory on one SM, the device has {device.max_shared_mem}"
    rows, cols = output_tile(problem, cfg)
    threads = 32 * cfg.num_warps
    regs = min(255, int(accumulator_regs(rows, cols, cfg.num_warps)) + _REGS_BESIDE_ACCUMULATOR)
    if n * threads * regs > _REGS_PER_SM:
        return f"{n} programs of {cfg.num_warps} warps with a {rows}x{cols} accumulator do not fit one SM's registers"
    return None


def blocks_fit_problem(problem: Problem, cfg: KernelConfig, device: DeviceInfo) -> str | None:
    # A block more than twice the padded dimension only adds masked work.
    if problem.pass_ == "dw":
        checks = (("BLOCK_N", cfg.BLOCK_N, problem.N), ("BLOCK_K", cfg.BLOCK_K, problem.K))
    else:
        col_name, cols, red_name, red = output_dims(problem)
        checks = (("BLOCK_N", cfg.BLOCK_N, cols), ("BLOCK_K", cfg.BLOCK_K, red))
    for name, block, size in checks:
        if block > max(16, _next_pow2(size)):
            return f"{name}={block} is larger than the dimension it tiles ({size})"
    return None


def warps_fit_tile(problem: Problem, cfg: KernelConfig, device: DeviceInfo) -> str | None:
    rows, cols = output_tile(problem, cfg)
    # Fewer than 16 accumulator elements per thread leaves warps idle in the MMA.
    if accumulator_regs(rows, cols, cfg.num_warps) < 16:
        return f"{cfg.num_warps} warps are too many for a {rows}x{cols} output tile"
    return None


PREDICATES: tuple[Predicate, ...] = (
    fits_shared_memory,
    tma_supported,
    tma_aligned,
    tma_store_possible,
    gather_copy_applies,
    warp_spec_possible,
    programs_fit_sm,
    blocks_fit_problem,
    warps_fit_tile,
)

# Rules the launcher enforces on any explicit config (the others only prune the search).
HARD_PREDICATES: tuple[Predicate, ...] = (
    fits_shared_memory, tma_supported, tma_aligned, tma_store_possible, gather_copy_applies, warp_spec_possible,
)


def why_illegal(problem: Problem, cfg: KernelConfig, device: DeviceInfo, predicates=PREDICATES) -> str | None:
    for predicate in predicates:
        reason = predicate(problem, cfg, device)
        if reason is not None:
            return reason
    return None


def check_config(problem: Problem, cfg: KernelConfig, device: DeviceInfo) -> None:
    """Raise ``ConfigError`` when ``cfg`` cannot run ``problem`` on ``device``."""
    reason = why_illegal(problem, cfg, device, HARD_PREDICATES)
    if reason is not None:
        raise ConfigError(f"config {cfg.short()} cannot run {problem.key}: {reason}")


def rows_block_fits_tokens(problem: Problem, cfg: KernelConfig, num_tokens: int) -> bool:
    """Token-dependent pruning: a BLOCK_M far above the average rows per expert wastes the MMA."""
    avg_rows = max(1, num_tokens * problem.topk // problem.E)
    return cfg.BLOCK_M <= max(64, 2 * _next_pow2(avg_rows))


def iter_space(space: str) -> Iterator[KernelConfig]:
    grid = SPACES[space]
    names = list(grid)
    for values in itertools.product(*(grid[n] for n in names)):
        yield KernelConfig(**dict(zip(names, values)))


def candidates(problem: Problem, device: DeviceInfo, space: str = "default", num_tokens: int | None = None) -> list[KernelConfig]:
    """Every legal config of ``space`` for ``problem`` on ``device``, pruned before compiling."""
    if space not in SPACES:
        raise ConfigError(f"unknown search space {space!r}; choose one of {', '.join(SPACES)}")
    out = []
    for cfg in iter_space(space):
        if why_illegal(problem, cfg, device) is not None:
            continue
        if num_tokens is not None and not rows_block_fits_tokens(problem, cfg, num_tokens):
            continue
        out.append(cfg)
    return out


def default_config(problem: Problem, device: DeviceInfo) -> KernelConfig:
    """The heuristic config used when no cache entry exists, picked by rule from the device.

    Rules (from a scan of Qwen3-30B-A3B's six problems on an H200, 2026-11-27, see BENCHMARKS.md):
    forward/dx take a 128x256 output tile stepping 64 deep; dw takes a 256-wide block on whichever
    operand arrives through TMA (the gathered one gets 128), since the copy engine feeds the wide
    side at full rate while gathered rows go through the LSU.
    TMA loads are on where the device and the row strides allow (sm90+, 16-byte rows): they
    measured 1.1-1.3x the pointer path. Stages: as many as shared memory holds, up to 4; tiles
    halve on devices too small for two stages.
    """
    if device.is_interpreter:
        return KernelConfig(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
    sorted_dw = problem.fusion == "sorted"
    if problem.pass_ == "dw" and problem.gather and not sorted_dw:
        # Gathered X rows arrive through the LSU with long latency: a shallow 32-row step and five
        # stages hide it (391 vs 329 TFLOP/s for 64 rows x 3 stages, up dW at T=16384).
        base = KernelConfig(BLOCK_M=32, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=5)
    elif sorted_dw:
        # Both operands through TMA: the best of a scan at 4096 and 16384 tokens, or within 9% of
        # it (Qwen3-30B-A3B, H200, 2026-11-27). Warp-specialised where Triton can (Hopper, 16-bit):
        # 1.35x / 1.30x (up / down dW, 4096 tokens), 1.05x / 0.99x (16384), Qwen3-30B-A3B, H100,
        # 2026-11-28; the best of 34 warp-specialised configs by geometric mean over the four.
        base = KernelConfig(BLOCK_M=64, BLOCK_N=128, BLOCK_K=256, GROUP_M=8, num_warps=8, num_stages=3)
        ws = replace(base, num_warps=4, TMA_LOAD=True, TMA_STORE=True, WARP_SPEC=True)
        if why_illegal(problem, ws, device, HARD_PREDICATES) is None:
            return ws
    elif problem.pass_ == "dw":
        wide_n = not problem.scatter  # dY comes through TMA unless gathered
        base = KernelConfig(BLOCK_M=64, BLOCK_N=256 if wide_n else 128, BLOCK_K=128 if wide_n else 256,
                            GROUP_M=8, num_warps=8, num_stages=3)
    else:
        base = KernelConfig(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    # dW's output is never scattered: its TMA store runs asynchronously (+5% measured). Up dW
    # copies its gathered X rows to expert order first: the sweep picked that for every bucket
    # from 2048 to 32768 tokens (1.10-1.26x, Qwen3-30B-A3B, H200, 2026-11-27).
    tma = replace(base, TMA_LOAD=True, TMA_STORE=problem.pass_ == "dw",
                  GATHER_COPY=problem.pass_ == "dw" and problem.gather and not sorted_dw)
    if tma_supported(problem, tma, device) is None and tma_aligned(problem, tma, device) is None:
        base = tma
    for cfg in _shrinking(_fit_small_dims(problem, base)):
        if why_illegal(problem, cfg, device, HARD_PREDICATES) is None and blocks_fit_problem(problem, cfg, device) is None:
            return cfg
    return KernelConfig(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=1)


def _fit_small_dims(problem: Problem, cfg: KernelConfig) -> KernelConfig:
    """Blocks no wider than the dimension they tile (16 at least): a LoRA GEMM's rank-16 side
    would otherwise reach the 32-wide floor of ``_shrinking`` with one stage and no TMA. Then
    fewer warps while the output tile is too small for them."""
    if problem.pass_ == "dw":
        n, k = problem.N, problem.K
    else:
        _, n, _, k = output_dims(problem)
    cfg = replace(cfg, BLOCK_N=min(cfg.BLOCK_N, max(16, _next_pow2(n))),
                  BLOCK_K=min(cfg.BLOCK_K, max(16, _next_pow2(k))))
    while cfg.num_warps > 4 and warps_fit_tile(problem, cfg, None) is not None:
        cfg = replace(cfg, num_warps=cfg.num_warps // 2)
    return cfg


def _shrinking(cfg: KernelConfig) -> Iterator[KernelConfig]:
    """Fewer stages first (down to 2), then smaller tiles: halve every block and retry."""
    while True:
        for stages in range(cfg.num_stages, 1, -1):
            yield replace(cfg, num_stages=stages)
        if max(cfg.BLOCK_M, cfg.BLOCK_N, cfg.BLOCK_K) <= 32:
            return
        cfg = replace(
            cfg,
            BLOCK_M=max(32, cfg.BLOCK_M // 2),
            BLOCK_N=max(32, cfg.BLOCK_N // 2),
            BLOCK_K=max(32, cfg.BLOCK_K // 2),
            num_warps=4,
        )
