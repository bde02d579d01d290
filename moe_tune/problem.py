"""The two values every layer of moe-tune passes around: a tuning ``Problem`` (the cache key)
and a ``KernelConfig`` (what the cache stores per token bucket).

Pure Python on purpose: the cache, the runtime loader and the CLI import this module without
importing torch or triton.

A problem is one grouped GEMM of one MoE layer in one pass. Its shape is always given as
``W[E, N, K]`` with ``y = x·Wᵀ`` (``weight_layout`` says whether the model stores W that way or
as ``[E, K, N]``), so the three passes of one GEMM share E, N and K:

    forward  Y[rows, N]  = X[rows, K] · W[e]ᵀ
    dx       dX[rows, K] = dY[rows, N] · W[e]
    dw       dW[e]       = dY[rows of e]ᵀ · X[rows of e]      ([N, K] per expert)

The flags describe the forward GEMM (gather: X rows read in token order, row = slot // k;
scatter: Y rows written in token-slot order; weighted: Y rows multiplied by their routing weight);
each pass's launcher derives from them where it gathers and scatters, and a weighted dx multiplies
its rows by the weight too. The experts blocks' down dx runs without that multiply, so their dx
problem is the unweighted one (``MoeShape.problems``). ``fusion`` names the fused
variant the experts block launches (``FUSIONS``); "none" is the plain grouped GEMM.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from moe_tune.errors import InvalidInputError

PASSES = ("forward", "dx", "dw")
# How the experts block runs a problem's kernel (see ``Problem``): "sorted" is a dW whose gathered
# operand the block already copied to expert order (and, for the down GEMM, whose routing weight
# is already folded into the other operand), so both operands stream through TMA.
# "sort" is a forward or dx that gathers its A rows and also writes them in expert order, with no
# fused epilogue (``SORT_A``). gpt-oss's block launched its up forward and down dx so until a
# separate row copy measured faster (BENCHMARKS.md, fourteenth session); no block launches it now.
FUSIONS = ("none", "sorted", "sort")
# How a problem's weight is stored: "nk" is W[E, N, K] (y = x·Wᵀ, transformers' default); "kn" is
# W[E, K, N] (y = x·W, transformers' ``is_transposed=True``: gpt-oss). The kernels read either
# through swapped strides, so the passes differ in access pattern, not in FLOPs.
WEIGHT_LAYOUTS = ("nk", "kn")
# The experts block a ``MoeShape`` describes: "concat" is the Qwen3-MoE family (gate|up rows
# concatenated, [E, N, K] weights, no bias, SwiGLU: ``moe_tune.ops.block``); "gpt_oss" stores
# [E, K, N] weights with biases, gate/up interleaved, a clamped SwiGLU (``moe_tune.ops.gptoss``).
EXPERT_LAYOUTS = ("concat", "gpt_oss")
DTYPES = ("bfloat16", "float16", "float32")
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise InvalidInputError(message)


def _as_bool(value: Any, name: str) -> bool:
    _require(isinstance(value, bool), f"{name} must be true or false, got {value!r}")
    return value


def _as_pos_int(value: Any, name: str) -> int:
    # bool is an int subclass: refuse it explicitly so `true` never reads as 1.
    _require(
        isinstance(value, int) and not isinstance(value, bool) and value > 0,
        f"{name} must be a positive integer, got {value!r}",
    )
    return value


# An SM holds at most a few programs of these kernels (shared memory, registers); more only queue.
MAX_PROGRAMS_PER_SM = 4


def _is_pow2(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


@dataclass(frozen=True, order=True)
class KernelConfig:
    """Every tunable parameter of the grouped-GEMM kernels.

    Field names equal the kernels' constexpr names and the cache's JSON keys (no translation).
    BLOCK_M tiles the routed rows, BLOCK_N the output columns, BLOCK_K the reduction (for dw:
    BLOCK_N × BLOCK_K is the output tile of W's shape and BLOCK_M steps over the expert's rows).
    TMA_LOAD reads every operand that is contiguous in memory (the weight always, activations
    unless gathered) through tensor descriptors; TMA_STORE writes a non-scattered output that way.
    GATHER_COPY (the one host-side knob) copies a gathered operand into expert order before the
    kernel — a dW's, or the A rows of a forward or dx — so it streams through TMA: rows × width
    elements of scratch for a kernel that no longer waits on gathered rows (up dW on an H200:
    391 → 583 TFLOP/s for the kernel; gpt-oss-20b's up forward at 16384 tokens: 3.62 ms gathered,
    3.09 + 0.16 for the copy).
    WARP_SPEC warp-specialises the reduction loop (Triton's Hopper pass): one producer warpgroup
    issues the TMA copies and two consumer warpgroups of ``num_warps`` warps each run the MMAs on
    half the tile; it needs both operands through TMA (nothing gathered) and a 16-bit dtype.
    PROGRAMS_PER_SM sizes the persistent grid (programs per SM): with 2, where shared memory and
    registers let two programs share an SM, one program's epilogue and loads run beside the
    other's MMAs (a launch parameter, not a constexpr; the kernels see it through ``NUM_SMS``).
    """

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int = 8
    num_warps: int = 4
    num_stages: int = 3
    TMA_LOAD: bool = False
    TMA_STORE: bool = False
    GATHER_COPY: bool = False
    WARP_SPEC: bool = False
    PROGRAMS_PER_SM: int = 1

    def __post_init__(self) -> None:
        for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps"):
            value = _as_pos_int(getattr(self, name), name)
            _require(_is_pow2(value), f"{name} must be a power of two, got {value}")
        _as_pos_int(self.GROUP_M, "GROUP_M")
        _as_pos_int(self.num_stages, "num_stages")
        _as_bool(self.TMA_LOAD, "TMA_LOAD")
        _as_bool(self.TMA_STORE, "TMA_STORE")
        _as_bool(self.GATHER_COPY, "GATHER_COPY")
        _as_bool(self.WARP_SPEC, "WARP_SPEC")
        programs = _as_pos_int(self.PROGRAMS_PER_SM, "PROGRAMS_PER_SM")
        _require(programs <= MAX_PROGRAMS_PER_SM,
                 f"PROGRAMS_PER_SM must be at most {MAX_PROGRAMS_PER_SM}, got {programs}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "KernelConfig":
        _require(isinstance(data, Mapping), f"a kernel config must be an object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        _require(not unknown, f"unknown kernel config keys: {', '.join(sorted(unknown))}")
        missing = {"BLOCK_M", "BLOCK_N", "BLOCK_K"} - set(data)
        _require(not missing, f"kernel config lacks {', '.join(sorted(missing))}")
        return cls(**dict(data))

    def short(self) -> str:
        """Compact one-line form for tables and logs, e.g. ``128x128x64 g8 w4 s3 tma:LS copy p2``."""
        tma = ("L" if self.TMA_LOAD else "") + ("S" if self.TMA_STORE else "")
        return (
            f"{self.BLOCK_M}x{self.BLOCK_N}x{self.BLOCK_K} g{self.GROUP_M} "
            f"w{self.num_warps} s{self.num_stages}" + (f" tma:{tma}" if tma else "")
            + (" copy" if self.GATHER_COPY else "") + (" ws" if self.WARP_SPEC else "")
            + (f" p{self.PROGRAMS_PER_SM}" if self.PROGRAMS_PER_SM > 1 else "")
        )


@dataclass(frozen=True, order=True)
class Problem:
    """One tuning problem: the identity of a compiled kernel plus the data layout it serves.

    The token count is not part of it (one compile serves every T); it selects the bucket inside
    the problem's cache entry.
    """

    pass_: str
    E: int
    N: int
    K: int
    topk: int
    dtype: str = "bfloat16"
    gather: bool = False
    scatter: bool = False
    weighted: bool = False
    fusion: str = "none"
    weight_layout: str = "nk"

    def __post_init__(self) -> None:
        _require(self.pass_ in PASSES, f"pass must be one of {', '.join(PASSES)}, got {self.pass_!r}")
        _require(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("E", "N", "K", "topk"):
            _as_pos_int(getattr(self, name), name)
        for name in ("gather", "scatter", "weighted"):
            _as_bool(getattr(self, name), name)
        _require(self.fusion in FUSIONS, f"fusion must be one of {', '.join(FUSIONS)}, got {self.fusion!r}")
        if self.fusion == "sorted":
            _require(self.pass_ == "dw" and self.gather != self.scatter,
                     "fusion 'sorted' is the dw of a gathered or scattered GEMM")
        if self.fusion == "sort":
            _require((self.pass_ == "forward" and self.gather and not self.scatter)
                     or (self.pass_ == "dx" and self.scatter and not self.gather),
                     "fusion 'sort' is the forward of a gathered GEMM or the dx of a scattered one")
        _require(self.weight_layout in WEIGHT_LAYOUTS,
                 f"weight_layout must be one of {', '.join(WEIGHT_LAYOUTS)}, got {self.weight_layout!r}")

    @property
    def key(self) -> str:
        """Clear-text cache key, e.g. ``dw/E128/N1536/K2048/k8/bfloat16/gather/sorted`` (a
        ``kn`` weight layout adds ``/kn``)."""
        flags = [f for f in ("gather", "scatter", "weighted") if getattr(self, f)]
        parts = [self.pass_, f"E{self.E}", f"N{self.N}", f"K{self.K}", f"k{self.topk}", self.dtype]
        fusion = [self.fusion] if self.fusion != "none" else []
        layout = [self.weight_layout] if self.weight_layout != "nk" else []
        return "/".join(parts + (flags or ["plain"]) + fusion + layout)

    @property
    def gemm(self) -> str:
        """Which GEMM of the layer this is, by its layout: ``up`` gathers, ``down`` scatters."""
        if self.gather and not self.scatter:
            return "up"
        if self.scatter and not self.gather:
            return "down"
        return "custom"

    def flops(self, num_tokens: int) -> int:
        """2·M·N·K for every pass, M = T·k routed rows."""
        return 2 * num_tokens * self.topk * self.N * self.K

    def with_pass(self, pass_: str) -> "Problem":
        """The plain (unfused) problem of the same GEMM in another pass."""
        return dataclasses.replace(self, pass_=pass_, fusion="none")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["pass"] = data.pop("pass_")
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Problem":
        _require(isinstance(data, Mapping), f"a problem must be an object, got {type(data).__name__}")
        fields = dict(data)
        _require("pass" in fields, "problem lacks 'pass'")
        fields["pass_"] = fields.pop("pass")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(fields) - names
        _require(not unknown, f"unknown problem keys: {', '.join(sorted(unknown))}")
        return cls(**fields)


@dataclass(frozen=True)
class MoeShape:
    """Per-expert shapes of one MoE layer (after expert/tensor parallel splitting)."""

    E: int
    H: int
    I: int
    topk: int
    layout: str = "concat"  # EXPERT_LAYOUTS

    def __post_init__(self) -> None:
        for name in ("E", "H", "I", "topk"):
            _as_pos_int(getattr(self, name), name)
        _require(self.topk <= self.E, f"topk ({self.topk}) cannot exceed the expert count ({self.E})")
        _require(self.layout in EXPERT_LAYOUTS,
                 f"layout must be one of {', '.join(EXPERT_LAYOUTS)}, got {self.layout!r}")

    def problems(self, dtype: str = "bfloat16") -> list[Problem]:
        """The six problems the experts block launches (either layout: gpt-oss's reads its [E, K, N]
        weights as stored, ``moe_tune.ops.gptoss``): up (gate_up, gathered) and down (scattered,
        routing-weighted) in forward, dx and dw, both dW on expert-ordered operands ("sorted").
        The down dx runs unweighted, so its problem is the unweighted one: its output dA_raw gives
        the routing-weight gradient ⟨dA_raw, A⟩, and the weight joins dA in the activation's
        backward. (Caches that key it weighted still serve it: ``runtime.interchangeable``.)"""
        layout = "kn" if self.layout == "gpt_oss" else "nk"
        up = Problem("forward", self.E, 2 * self.I, self.H, self.topk, dtype, gather=True, weight_layout=layout)
        down = Problem("forward", self.E, self.H, self.I, self.topk, dtype, scatter=True, weighted=True,
                       weight_layout=layout)
        out = []
        for gemm in (up, down):
            for pass_ in PASSES:
                problem = dataclasses.replace(gemm.with_pass(pass_), fusion="sorted" if pass_ == "dw" else "none")
                if pass_ == "dx":
                    problem = dataclasses.replace(problem, weighted=False)
                out.append(problem)
        return out

    def lora_rank_of(self, problem: Problem) -> int | None:
        """The rank r at which ``problem`` is one of the LoRA factors' GEMMs of this layer
        (``lora_problems(r)``, N = r or K = r, r below H and I); None otherwise."""
        for rank in sorted(r for r in {problem.N, problem.K} if 0 < r < min(self.H, self.I)):
            factors = [p for name, p in self.lora_problems(rank, problem.dtype).items() if "_" in name.split(".")[0]]
            if problem in factors:
                return rank
        return None

    def lora_problems(self, rank: int, dtype: str = "bfloat16") -> dict[str, Problem]:
        """The grouped GEMMs the experts block launches with LoRA of rank ``rank`` on its weights
        (``moe_tune.ops.lora_block``), keyed ``"<matrix>.<pass>"``: ``up`` and ``down`` are the
        frozen base weights, ``up_a``/``down_a`` the LoRA factors A ``[E, r, K]`` (N = r) and
        ``up_b``/``down_b`` the factors B ``[E, N, r]`` (K = r). Each is a plain problem whose
        flags describe the launch exactly, so the sweep tunes and the cache stores it like any
        other. The four base problems are the block's own (``problems``); no base dW runs at all.
        With the gpt-oss layout (``moe_tune.ops.gptoss_lora``) the four base problems read the weights as
        stored ([E, K, N], ``kn``); PEFT's factors have the same per-expert shapes in both
        layouts, so their twelve are the same."""
        r = _as_pos_int(rank, "rank")
        E, H, I, k = self.E, self.H, self.I, self.topk
        base_layout = "kn" if self.layout == "gpt_oss" else "nk"

        def problem(pass_: str, n: int, kk: int, **flags: bool) -> Problem:
            return Problem(pass_, E, n, kk, k, dtype, **flags)

        def base(pass_: str, n: int, kk: int, **flags: bool) -> Problem:
            return Problem(pass_, E, n, kk, k, dtype, weight_layout=base_layout, **flags)

        return {
            "up.forward": base("forward", 2 * I, H, gather=True),
            "up.dx": base("dx", 2 * I, H, gather=True),
            "down.forward": base("forward", H, I, scatter=True, weighted=True),
            "down.dx": base("dx", H, I, scatter=True),  # unweighted, as the experts block's: dA_raw feeds dS
            "up_a.forward": problem("forward", r, H, gather=True),  # L1 = X·A1ᵀ
            "up_a.dx": problem("dx", r, H, gather=True),  # dL1·A1, scattered to slot order
            "up_a.dw": problem("dw", r, H, gather=True),  # dL1ᵀ·X
            "up_b.forward": problem("forward", 2 * I, r),  # ΔH = L1·B1ᵀ
            "up_b.dx": problem("dx", 2 * I, r),  # dL1 = dH·B1
            "up_b.dw": problem("dw", 2 * I, r),  # dHᵀ·L1
            "down_a.forward": problem("forward", r, I),  # L2 = A·A2ᵀ
            "down_a.dx": problem("dx", r, I, weighted=True),  # w·(P·A2), P = G·B2
            "down_a.dw": problem("dw", r, I),  # Pᵀ·(w·A)
            "down_b.forward": problem("forward", H, r, scatter=True, weighted=True),  # w·L2·B2ᵀ
            "down_b.dx": problem("dx", H, r, scatter=True),  # P = G·B2, unweighted
            "down_b.dw": problem("dw", H, r, scatter=True, weighted=True),  # (w·G)ᵀ·L2
        }
