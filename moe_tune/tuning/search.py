"""The search: which configs to compile, screen and re-time for each (problem, token bucket).

Data flow for one problem:

1. ``plan_problem`` — per bucket, the heuristic default's neighbours (one step along one
   parameter of the full space: the default comes from a measured scan, so better configs sit
   near it) and then the legal configs of the space (``moe_tune.space.candidates``) ranked by
   ``estimate_ms``, a cheap analytic cost model, where the best-ranked config of each output
   tile shape goes first, so a cost model that misjudges one tile shape cannot hide it. The
   buckets' rankings are merged round-robin into one compile list of at most
   ``policy.max_compile`` configs (compiles dominate a naive sweep: ~1.4 s of CPU each), the
   heuristic default first. Each bucket screens the first ``policy.screen`` compiled configs of
   its own ranking.
2. ``search_bucket`` — screen: every screened config is gated and timed briefly; careful: the
   ``policy.finalists`` fastest, the previous bucket's winner and runner-up (seeds: neighbouring
   buckets usually share a winner) and the default are re-timed with many launches; ties: configs
   within ``policy.tie_tolerance`` of the fastest are timed again, round by round, and judged on
   the median of all their careful samples. The fastest config that passed the gate is the
   challenger; unless it is the default, the two are timed head to head in interleaved rounds
   and the default stays unless the challenger beats it beyond the noise (``versus``). That
   decides the winner; the head-to-head times give the speedup over the default.

Measurements come from an ``Evaluator`` (the sweep's runs the worker process and journals every
outcome; tests inject a deterministic one). Nothing here touches torch. Results are
``results.BucketResult``s.
``policy_for(space, exhaustive=True)`` lifts every cut: all legal configs (and the default's
neighbours) are compiled and screened, and the best 16 re-timed, which is what ``--exhaustive``
and the GPU benchmark's comparison run.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Protocol

from moe_tune.device import DeviceInfo
from moe_tune.problem import DTYPE_BYTES, KernelConfig, Problem
from moe_tune.space import (
    SPACES,
    a_gathered,
    accumulator_regs,
    candidates,
    default_config,
    output_scattered,
    output_tile,
    rows_block_fits_tokens,
    why_illegal,
)
from moe_tune.tuning.results import BucketResult, Timed
from moe_tune.tuning.versus import decide

# ---------------------------------------------------------------------------------------------
# Policy
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchPolicy:
    max_compile: int | None  # configs compiled per problem (None: every legal one)
    screen: int | None  # configs screened per bucket (None: every compiled one)
    finalists: int  # fastest screened configs re-timed carefully per bucket
    tie_tolerance: float = 0.02  # careful medians this close to the best are re-timed
    tie_rounds: int = 2
    versus_rounds: int = 4  # interleaved rounds of the winner against the default (even: each goes first half the time)

    def to_dict(self) -> dict:
        return {"max_compile": self.max_compile, "screen": self.screen, "finalists": self.finalists,
                "tie_tolerance": self.tie_tolerance, "tie_rounds": self.tie_rounds,
                "versus_rounds": self.versus_rounds}


# fast: ~56 compiles a problem (~6 s of a 14-process pool) and ~32 screens a bucket keep the
# default qwen3-30b-a3b sweep (6 problems × 6 buckets) within a few minutes on one H100.
FAST = SearchPolicy(max_compile=56, screen=32, finalists=5)
EXHAUSTIVE = SearchPolicy(max_compile=None, screen=None, finalists=16)
# The interpreter runs a launch in ~0.1 s: a handful of candidates exercises every stage.
INTERPRETER = SearchPolicy(max_compile=6, screen=4, finalists=2, tie_rounds=1, versus_rounds=1)


def policy_for(space: str, *, exhaustive: bool = False, interpreter: bool = False) -> SearchPolicy:
    if exhaustive:
        return EXHAUSTIVE
    if interpreter:
        return INTERPRETER
    return FAST


# ---------------------------------------------------------------------------------------------
# Cost model
# ---------------------------------------------------------------------------------------------

# Per-SM rates of an H100 SXM (989 dense bf16 TFLOP/s over 132 SMs at ~1.0 GHz-equivalent units
# of ns; ~5.5 TB/s of L2 bandwidth shared by the SMs; 3.35 TB/s of HBM). Only ratios matter:
# the model ranks configs, it does not predict times.
_MMA_FLOP_PER_NS = {2: 7500.0, 4: 3750.0}  # per SM, by element size (fp32 runs TF32 at half rate)
_L2_BYTES_PER_NS = 42.0  # per SM
_HBM_BYTES_PER_NS = 3350.0  # whole device
_STEP_NS = 35.0  # fixed cost of one reduction step (barriers, address math, loop)
_TILE_NS = 500.0  # fixed cost of one output tile (expert lookup, prologue, epilogue fence)
_DESCRIPTOR_NS = 250.0  # a tensor descriptor made on the device (written, fenced) for one tile
_SPILL_POWER = 2.0  # an accumulator past 128 registers a thread: efficiency × (128/regs)^power
# Pipeline depth: with one CTA per SM (persistent grid) only the stages hide load latency.
_STAGE_FACTOR = {1: 1.9, 2: 1.3, 3: 1.08, 4: 1.0, 5: 1.0, 6: 1.01}


def _mma_efficiency(rows: int, cols: int, num_warps: int) -> float:
    """Tensor-core efficiency of a rows×cols fp32 accumulator split over ``num_warps`` warps."""
    regs = accumulator_regs(rows, cols, num_warps)
    eff = 0.85
    if regs > 128:
        eff *= (128 / regs) ** _SPILL_POWER  # spills, or too few registers left for operands
    if regs < 32:
        eff *= 0.8  # warps idle in the MMA
    if rows * cols < 64 * 64:
        eff *= 0.75
    return eff


def _blocks(rows: float, block: int) -> float:
    """Expected row blocks of an expert holding ``rows`` routed rows on average (Poisson-ish:
    experts with no rows cost nothing)."""
    if rows <= 0:
        return 0.0
    if rows < block:
        return 1.0 - math.exp(-rows)
    return math.ceil(rows / block)


def estimate_ms(problem: Problem, cfg: KernelConfig, tokens: int, device: DeviceInfo) -> float:
    """Analytic time of one launch, for ranking only (uniform routing assumed)."""
    nbytes = DTYPE_BYTES[problem.dtype]
    mma_rate = _MMA_FLOP_PER_NS[nbytes] if nbytes in _MMA_FLOP_PER_NS else _MMA_FLOP_PER_NS[2]
    sms = max(1, device.sm_count)
    rows = tokens * problem.topk
    per_expert = rows / problem.E
    copy_ns = 0.0
    if problem.pass_ == "dw":
        tile_r, tile_c, step = cfg.BLOCK_N, cfg.BLOCK_K, cfg.BLOCK_M
        tiles = problem.E * math.ceil(problem.N / tile_r) * math.ceil(problem.K / tile_c)
        steps = _blocks(per_expert, step)
        # dY and/or X rows read indirectly, unless they come in expert order (fusion "sorted")
        # or are copied there first (GATHER_COPY: the copy reads and writes each row once).
        gathered = int(problem.gather) + int(problem.scatter) if problem.fusion != "sorted" else 0
        if cfg.GATHER_COPY and gathered:
            copy_cols = (problem.K if problem.gather else 0) + (problem.N if problem.scatter else 0)
            copy_ns = 2 * rows * copy_cols * nbytes / _HBM_BYTES_PER_NS
            gathered = 0
        # Each tile makes a tensor descriptor per operand it loads through TMA (bounded by its
        # expert's rows), a latency its few reduction steps cannot hide when experts are small.
        descriptors = 2 - gathered if cfg.TMA_LOAD else 0
        operands = 2
    else:
        out = problem.N if problem.pass_ == "forward" else problem.K
        red = problem.K if problem.pass_ == "forward" else problem.N
        tile_r, tile_c, step = cfg.BLOCK_M, cfg.BLOCK_N, cfg.BLOCK_K
        tiles = problem.E * _blocks(per_expert, tile_r) * math.ceil(out / tile_c)
        steps = math.ceil(red / step)
        gathered = int(a_gathered(problem))
        if cfg.GATHER_COPY and gathered:  # A's rows copied to expert order first, then TMA
            copy_ns = 2 * rows * red * nbytes / _HBM_BYTES_PER_NS
            gathered = 0
        descriptors = 0  # made once per program
        operands = 2
    # Warp specialisation: two consumer warpgroups of ``num_warps`` share the accumulator.
    mma_warps = cfg.num_warps * (2 if cfg.WARP_SPEC else 1)
    mma_ns = 2 * tile_r * tile_c * step / (mma_rate * _mma_efficiency(tile_r, tile_c, mma_warps))
    load_ns = (tile_r + tile_c) * step * nbytes / _L2_BYTES_PER_NS
    # Gathered rows cannot go through TMA and load ~15% slower; TMA loads of the others ~10% faster.
    direct = operands - gathered
    load_scale = (gathered * 1.15 + direct * (0.9 if cfg.TMA_LOAD else 1.0)) / operands
    step_ns = max(mma_ns, load_ns * load_scale) * _STAGE_FACTOR.get(cfg.num_stages, 1.0) + _STEP_NS
    store_ns = tile_r * tile_c * nbytes / _L2_BYTES_PER_NS * (0.95 if cfg.TMA_STORE else 1.0)
    if output_scattered(problem):
        store_ns *= 1.2
    # A tile's fixed costs (epilogue, descriptors, lookups) run beside another tile's main loop
    # with several programs per SM, or with warp specialisation (the producer warps load the next
    # tile while the consumers store this one).
    overlap = 2 if cfg.WARP_SPEC else cfg.PROGRAMS_PER_SM
    tile_ns = steps * step_ns + (store_ns + _TILE_NS + descriptors * _DESCRIPTOR_NS) / overlap
    compute_ns = math.ceil(tiles / sms) * tile_ns if tiles else _TILE_NS
    weight_bytes = problem.E * problem.N * problem.K * nbytes
    act_bytes = rows * (problem.N + problem.K) * nbytes
    hbm_ns = (weight_bytes + act_bytes) / _HBM_BYTES_PER_NS
    # Compute and HBM traffic overlap imperfectly; the smaller term also breaks the ties of
    # configs that all sit on the HBM floor (small buckets stream every expert's weights).
    return (max(compute_ns, hbm_ns) + 0.25 * min(compute_ns, hbm_ns) + copy_ns) / 1e6


def rank(problem: Problem, configs: Iterable[KernelConfig], tokens: int, device: DeviceInfo) -> list[KernelConfig]:
    """``configs`` best-first: the best of each output tile shape first, then the rest, each
    part by the cost model (ties by config order, so the ranking is deterministic)."""
    scored = sorted(configs, key=lambda c: (estimate_ms(problem, c, tokens, device), c))
    seen, heads, rest = set(), [], []
    for cfg in scored:
        tile = output_tile(problem, cfg)
        (rest if tile in seen else heads).append(cfg)
        seen.add(tile)
    return heads + rest


def neighbours(problem: Problem, cfg: KernelConfig, device: DeviceInfo, tokens: int) -> list[KernelConfig]:
    """Legal configs one step from ``cfg`` along one parameter of the full space (the adjacent
    block sizes, GROUP_M, warps, stages and programs per SM, each TMA flag toggled)."""
    found = []
    for name, values in SPACES["full"].items():
        current = getattr(cfg, name)
        lower = [v for v in values if v < current]
        higher = [v for v in values if v > current]
        for value in ([lower[-1]] if lower else []) + ([higher[0]] if higher else []):
            near = dataclasses.replace(cfg, **{name: value})
            if why_illegal(problem, near, device) is None and rows_block_fits_tokens(problem, near, tokens):
                found.append(near)
    return found


# ---------------------------------------------------------------------------------------------
# Plans
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProblemPlan:
    problem: Problem
    default: KernelConfig
    compile: list[KernelConfig]  # default first, then by rank over the buckets
    screen: dict[int, list[KernelConfig]]  # per bucket, in rank order
    legal: dict[int, int]  # per bucket: configs the space holds for it


def plan_problem(problem: Problem, device: DeviceInfo, space: str, buckets: Iterable[int],
                 policy: SearchPolicy) -> ProblemPlan:
    buckets = sorted(set(buckets))
    default = default_config(problem, device)
    ranked = {}
    for t in buckets:
        # The heuristic default comes from a measured scan: its neighbourhood goes first, even
        # where it leaves the space (the gathered dW default steps 32 rows, outside `default`).
        local = sorted(neighbours(problem, default, device, t), key=lambda c: (estimate_ms(problem, c, t, device), c))
        space_ranked = rank(problem, candidates(problem, device, space, num_tokens=t), t, device)
        ranked[t] = list(dict.fromkeys(local + space_ranked))
    compile_list = [default]
    chosen = {default}
    limit = policy.max_compile
    depth = max((len(r) for r in ranked.values()), default=0)
    for position in range(depth):
        for t in buckets:
            if limit is not None and len(compile_list) >= limit:
                break
            if position < len(ranked[t]) and ranked[t][position] not in chosen:
                chosen.add(ranked[t][position])
                compile_list.append(ranked[t][position])
    screen = {}
    for t in buckets:
        compiled = [c for c in ranked[t] if c in chosen]
        screen[t] = compiled if policy.screen is None else compiled[: policy.screen]
    return ProblemPlan(problem, default, compile_list, screen, {t: len(ranked[t]) for t in buckets})


# ---------------------------------------------------------------------------------------------
# Search
# ---------------------------------------------------------------------------------------------


class Evaluator(Protocol):
    def measure(self, problem: Problem, tokens: int, cfg: KernelConfig, stage: str):
        """An ``Outcome``-like object: ``ok``, ``median_ms``, ``spread_ms``, ``rel_error``."""

    def versus(self, problem: Problem, tokens: int, challenger: KernelConfig, default: KernelConfig, rounds: int):
        """A ``protocol.Versus``: the two timed in ``rounds`` interleaved rounds."""


def search_bucket(problem: Problem, tokens: int, screen: list[KernelConfig], default: KernelConfig,
                  evaluator: Evaluator, policy: SearchPolicy, seeds: Iterable[KernelConfig] = ()) -> BucketResult:
    """Screen, re-time the finalists, settle near-ties, face the default (module docstring)."""
    screened = {cfg: evaluator.measure(problem, tokens, cfg, "screen") for cfg in screen}
    return settle_bucket(problem, tokens, screen, screened, default, evaluator, policy, seeds)


def settle_bucket(problem: Problem, tokens: int, screen: list[KernelConfig], screened: Mapping[KernelConfig, object],
                  default: KernelConfig, evaluator: Evaluator, policy: SearchPolicy,
                  seeds: Iterable[KernelConfig] = ()) -> BucketResult:
    """The careful, tie and head-to-head stages of ``search_bucket``, given the screen's outcomes
    (``screened``: one per config of ``screen``, measured anywhere: the sweep spreads one bucket's
    screen over several GPUs and settles it on one, so that every careful time it compares comes
    from one card)."""
    failed: dict[str, str] = {}
    screen_ms: dict[KernelConfig, float] = {}

    def note_failure(cfg: KernelConfig, outcome) -> None:
        failed[cfg.short()] = outcome.error or "failed"

    for cfg in screen:
        outcome = screened[cfg]
        if outcome.ok:
            screen_ms[cfg] = outcome.median_ms
        else:
            note_failure(cfg, outcome)

    # -- careful ------------------------------------------------------------------------------
    by_screen = sorted(screen_ms, key=lambda c: (screen_ms[c], c))
    finalists: list[KernelConfig] = []
    for cfg in [*by_screen[: policy.finalists], *seeds, default]:
        if cfg not in finalists and cfg.short() not in failed:
            finalists.append(cfg)
    timed: dict[KernelConfig, Timed] = {}
    for cfg in finalists:
        outcome = evaluator.measure(problem, tokens, cfg, "careful")
        if outcome.ok:
            timed[cfg] = Timed(cfg, [outcome.median_ms], [outcome.spread_ms or 0.0], outcome.rel_error)
        else:
            note_failure(cfg, outcome)

    # -- near-ties ------------------------------------------------------------------------------
    for round_ in range(1, policy.tie_rounds + 1):
        if len(timed) < 2:
            break
        best = min(t.median_ms for t in timed.values())
        contenders = [c for c, t in timed.items() if t.median_ms <= best * (1 + policy.tie_tolerance)]
        if len(contenders) < 2:
            break
        for cfg in contenders:
            outcome = evaluator.measure(problem, tokens, cfg, f"tie{round_}")
            if outcome.ok:
                timed[cfg].medians.append(outcome.median_ms)
                timed[cfg].spreads.append(outcome.spread_ms or 0.0)
            else:  # flaky: a config that fails once is not trusted
                note_failure(cfg, outcome)
                del timed[cfg]

    ordered = sorted(timed.values(), key=lambda t: (t.median_ms, t.config))
    top = ordered[0] if ordered else None
    default_timed = timed.get(default)
    median_ms, spread_ms = (top.median_ms, top.spread_ms) if top else (None, None)
    default_ms = default_timed.median_ms if default_timed else None

    # -- the winner against the default -----------------------------------------------------------
    decision = None
    if top is not None and top.config != default and default_timed is not None and policy.versus_rounds:
        versus = evaluator.versus(problem, tokens, top.config, default, policy.versus_rounds)
        decision = decide(top.config, default, versus)
        top = timed[decision.winner]
        kept = versus.challenger if decision.kept == "challenger" else versus.default
        # The head-to-head's times are the fairest comparison with the default: report those.
        median_ms, spread_ms = (kept.median_ms, kept.spread_ms) if kept.ok else (top.median_ms, top.spread_ms)
        if versus.default.ok:
            default_ms = versus.default.median_ms
    return BucketResult(
        problem=problem,
        tokens=tokens,
        winner=top.config if top else None,
        median_ms=median_ms,
        spread_ms=spread_ms,
        rel_error=top.rel_error if top else None,
        default=default,
        default_ms=default_ms,
        screened=len(screen),
        timed=len(set(screen) | set(finalists)),
        failed=failed,
        careful=ordered,
        screen_ms=screen_ms,
        versus=decision,
    )


def measurements_planned(plan: ProblemPlan, policy: SearchPolicy) -> dict[int, int]:
    """Per bucket, the measurements ``search_bucket`` will most likely make (for progress bars):
    the screen, the finalists plus two seeds and the default, one tie round of two, the head to
    head."""
    return {t: len(s) + min(policy.finalists, len(s)) + 3 + (2 if policy.tie_rounds else 0)
            + (1 if policy.versus_rounds else 0) for t, s in plan.screen.items()}
