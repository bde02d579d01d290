"""The search logic (moe_tune/tuning/search.py) with an injected deterministic timer: what is
compiled and screened, who reaches the careful stage, how near-ties and failures are handled,
and that the exhaustive policy finds the true optimum (or keeps the default within the noise of
it: moe_tune/tuning/versus.py, tested in test_versus.py)."""

from __future__ import annotations

import hashlib
import math
from types import SimpleNamespace

import pytest

from moe_tune.device import DeviceInfo
from moe_tune.models import list_presets, load_preset
from moe_tune.problem import KernelConfig
from moe_tune.space import candidates, output_tile
from moe_tune.tuning.protocol import Versus
from moe_tune.tuning.search import (
    EXHAUSTIVE,
    FAST,
    INTERPRETER,
    SearchPolicy,
    estimate_ms,
    neighbours,
    plan_problem,
    policy_for,
    rank,
    search_bucket,
)
from moe_tune.tuning.versus import NOISE_FLOOR

H100 = DeviceInfo("NVIDIA H100 80GB HBM3", (9, 0), sm_count=132, max_shared_mem=232448)
QWEN = load_preset("qwen3-30b-a3b")
BUCKETS = (1024, 2048, 4096, 8192, 16384, 32768)


class FakeTimer:
    """Deterministic 'GPU': a config's time is a hash of (salt, config, tokens) in [1, 2) ms,
    unless overridden. ``wrong`` configs fail the gate, ``crash`` ones fail like a dead worker.
    Every call is recorded."""

    def __init__(self, salt: int, *, times=None, wrong=(), crash=(), jitter=None):
        self.salt = salt
        self.times = dict(times or {})
        self.wrong, self.crash = set(wrong), set(crash)
        self.jitter = jitter  # (cfg, stage) -> extra ms, to model noisy re-timings
        self.calls: list[tuple[KernelConfig, int, str]] = []

    def true_ms(self, cfg: KernelConfig, tokens: int) -> float:
        if cfg in self.times:
            return self.times[cfg]
        digest = hashlib.sha256(f"{self.salt}/{cfg.short()}/{tokens}".encode()).digest()
        return 1.0 + int.from_bytes(digest[:4], "little") / 2**32

    def measure(self, problem, tokens, cfg, stage):
        self.calls.append((cfg, tokens, stage))
        if cfg in self.wrong:
            return SimpleNamespace(ok=False, error="wrong result: relative error 0.25 > 0.01", median_ms=None,
                                   spread_ms=None, rel_error=0.25)
        if cfg in self.crash:
            return SimpleNamespace(ok=False, error="the worker died (exit code -11)", median_ms=None,
                                   spread_ms=None, rel_error=None)
        extra = self.jitter(cfg, stage) if self.jitter else 0.0
        return SimpleNamespace(ok=True, error=None, median_ms=self.true_ms(cfg, tokens) + extra, spread_ms=0.01,
                               rel_error=1e-3)

    def versus(self, problem, tokens, challenger, default, rounds):
        return Versus(self.measure(problem, tokens, challenger, "versus"),
                      self.measure(problem, tokens, default, "versus"))

    def stages(self, cfg):
        return [s for c, _, s in self.calls if c == cfg]

    def decided(self, best, default, tokens):
        """What the head to head keeps: ``best`` only when it beats the default beyond the noise
        (half the 0.01 ms spread, at least ``NOISE_FLOOR`` of the default's time)."""
        default_ms = self.true_ms(default, tokens)
        margin = max(0.005, NOISE_FLOOR * default_ms)
        return best if self.true_ms(best, tokens) < default_ms - margin else default


def test_plan_caps_compiles_and_puts_the_default_first():
    for problem in QWEN.problems():
        plan = plan_problem(problem, H100, "default", BUCKETS, FAST)
        assert plan.compile[0] == plan.default
        assert len(plan.compile) == FAST.max_compile == len(set(plan.compile))
        for tokens, screened in plan.screen.items():
            assert len(screened) == FAST.screen
            assert set(screened) <= set(plan.compile)
            legal = set(candidates(problem, H100, "default", num_tokens=tokens))
            assert set(screened) <= legal | set(neighbours(problem, plan.default, H100, tokens))


def test_plan_screens_every_output_tile_shape():
    # The cost model ranks configs, but the best of each output tile goes first: a model that
    # misjudges one tile shape cannot keep it out of the screen.
    for problem in QWEN.problems():
        plan = plan_problem(problem, H100, "default", BUCKETS, FAST)
        for tokens in BUCKETS:
            tiles = {output_tile(problem, c) for c in candidates(problem, H100, "default", num_tokens=tokens)}
            assert {output_tile(problem, c) for c in plan.screen[tokens]} >= tiles


def test_the_defaults_neighbourhood_is_screened_first():
    # The heuristic default comes from a measured scan; one step away along any parameter of the
    # full space is where a better config most likely sits, even outside the default space.
    for problem in QWEN.problems():
        plan = plan_problem(problem, H100, "default", BUCKETS, FAST)
        for tokens in BUCKETS:
            near = neighbours(problem, plan.default, H100, tokens)
            assert 5 <= len(near) and plan.screen[tokens][: len(near)] == sorted(
                near, key=lambda c: (estimate_ms(problem, c, tokens, H100), c))
            for cfg in near:
                changed = [f for f in cfg.to_dict() if cfg.to_dict()[f] != plan.default.to_dict()[f]]
                assert len(changed) == 1


def test_exhaustive_plan_keeps_everything():
    problem = QWEN.problems()[2]
    plan = plan_problem(problem, H100, "default", (4096,), EXHAUSTIVE)
    legal = set(candidates(problem, H100, "default", num_tokens=4096)) | set(neighbours(problem, plan.default, H100, 4096))
    assert set(plan.screen[4096]) == legal and set(plan.compile) == legal | {plan.default}
    assert policy_for("default", exhaustive=True) is EXHAUSTIVE
    assert policy_for("interpret", interpreter=True) is INTERPRETER


def test_cost_model_is_finite_and_ranking_deterministic(rng):
    presets = rng.sample(list_presets(include_test=False), 4)
    for preset in presets:
        for problem in preset.shape.problems(rng.choice(["bfloat16", "float32"])):
            tokens = rng.choice([1, 16, 1000, 4096, 65536])
            found = candidates(problem, H100, "default", num_tokens=tokens)
            for cfg in found:
                assert 0 < estimate_ms(problem, cfg, tokens, H100) < math.inf
            shuffled = list(found)
            rng.shuffle(shuffled)
            assert rank(problem, shuffled, tokens, H100) == rank(problem, found, tokens, H100)


def test_cost_model_prefers_big_tiles_for_big_buckets():
    problem = QWEN.problems()[0]
    small = KernelConfig(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4)
    big = KernelConfig(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3)
    assert estimate_ms(problem, big, 32768, H100) < estimate_ms(problem, small, 32768, H100)


# Screen medians measured on an H200 (2026-11-28, bf16, 4096 tokens): gpt-oss-120b's up dW from the
# exhaustive sweep of its journal, Qwen3-30B-A3B's up dW from the ninth session's. Each list is
# fastest first; the configs differ in what the cost model must weigh: two programs per SM, TMA
# loads whose per-tile descriptors a two-step reduction cannot hide, warp specialisation's split
# accumulator, and an accumulator of 256 registers a thread.
H200 = DeviceInfo("NVIDIA H200", (9, 0), sm_count=132, max_shared_mem=232448)
_MEASURED_ORDERS = [
    ("gpt-oss-120b", "up", [
        (dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=3, TMA_STORE=True,
              PROGRAMS_PER_SM=2), 2.068),
        (dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=3, TMA_LOAD=True, TMA_STORE=True,
              PROGRAMS_PER_SM=2), 2.934),
        (dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=3, TMA_STORE=True), 3.062),
        (dict(BLOCK_M=32, BLOCK_N=256, BLOCK_K=128, num_warps=4, num_stages=5, TMA_LOAD=True, TMA_STORE=True),
         8.864),
    ]),
    ("qwen3-30b-a3b", "up", [
        (dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=256, GROUP_M=4, num_warps=4, num_stages=3, TMA_LOAD=True,
              TMA_STORE=True, WARP_SPEC=True), 0.4775),
        (dict(BLOCK_M=64, BLOCK_N=256, BLOCK_K=128, num_warps=8, num_stages=3, TMA_LOAD=True, TMA_STORE=True),
         0.6572),
        (dict(BLOCK_M=64, BLOCK_N=256, BLOCK_K=128, num_warps=4, num_stages=3, TMA_LOAD=True, TMA_STORE=True),
         1.7988),
    ]),
]


@pytest.mark.parametrize("model,gemm,measured", _MEASURED_ORDERS, ids=[m for m, _, _ in _MEASURED_ORDERS])
def test_cost_model_orders_configs_as_an_h200_measured_them(model, gemm, measured):
    problem = next(p for p in load_preset(model).problems() if p.pass_ == "dw" and p.gemm == gemm)
    configs = [KernelConfig(**fields) for fields, _ in measured]
    estimates = [estimate_ms(problem, cfg, 4096, H200) for cfg in configs]
    assert estimates == sorted(estimates), [c.short() for c in configs]


def test_search_picks_the_fastest_finalist(rng):
    problem = QWEN.problems()[0]
    plan = plan_problem(problem, H100, "default", (4096,), FAST)
    timer = FakeTimer(rng.getrandbits(32))
    result = search_bucket(problem, 4096, plan.screen[4096], plan.default, timer, FAST)
    pool = set(plan.screen[4096]) | {plan.default}
    assert result.winner == timer.decided(min(pool, key=lambda c: timer.true_ms(c, 4096)), plan.default, 4096)
    assert result.median_ms == pytest.approx(timer.true_ms(result.winner, 4096))
    assert result.default_ms == pytest.approx(timer.true_ms(plan.default, 4096))
    assert result.speedup == pytest.approx(result.default_ms / result.median_ms)
    assert result.tflops == pytest.approx(problem.flops(4096) / (result.median_ms * 1e-3) / 1e12)
    # Each screened config is screened once; only the finalists and the default are re-timed.
    careful = {c for c, _, s in timer.calls if s == "careful"}
    assert plan.default in careful and len(careful) <= FAST.finalists + 1
    assert all(timer.stages(c).count("screen") == 1 for c in plan.screen[4096])


def test_a_wrong_config_never_wins_even_when_fastest(rng):
    problem = QWEN.problems()[3]
    plan = plan_problem(problem, H100, "default", (8192,), FAST)
    cheat, crasher = plan.screen[8192][3], plan.screen[8192][5]
    timer = FakeTimer(rng.getrandbits(32), times={cheat: 0.01, crasher: 0.02}, wrong={cheat}, crash={crasher})
    result = search_bucket(problem, 8192, plan.screen[8192], plan.default, timer, FAST)
    assert result.winner not in (cheat, crasher)
    assert "wrong result" in result.failed[cheat.short()] and "died" in result.failed[crasher.short()]
    # Failed in the screen: never timed again.
    assert timer.stages(cheat) == ["screen"] and timer.stages(crasher) == ["screen"]


def test_seeds_reach_the_careful_stage_and_can_win(rng):
    problem = QWEN.problems()[1]
    plan = plan_problem(problem, H100, "default", (2048,), FAST)
    outside = [c for c in plan.compile if c not in plan.screen[2048] and c != plan.default][0]
    timer = FakeTimer(rng.getrandbits(32), times={outside: 0.5})
    result = search_bucket(problem, 2048, plan.screen[2048], plan.default, timer, FAST, seeds=[outside])
    assert result.winner == outside
    assert timer.stages(outside)[0] == "careful"


def test_near_ties_are_retimed_and_judged_on_all_rounds(rng):
    problem = QWEN.problems()[4]
    plan = plan_problem(problem, H100, "default", (16384,), FAST)
    a, b = plan.screen[16384][:2]
    # a looks 0.5% faster once; b is faster in every re-timing.
    jitter = {(a, "careful"): -0.005, (a, "tie1"): 0.02, (a, "tie2"): 0.02}
    timer = FakeTimer(rng.getrandbits(32), times={a: 0.5, b: 0.5}, jitter=lambda c, s: jitter.get((c, s), 0.0))
    policy = SearchPolicy(max_compile=56, screen=32, finalists=5, tie_tolerance=0.02, tie_rounds=2)
    result = search_bucket(problem, 16384, plan.screen[16384], plan.default, timer, policy)
    assert timer.stages(a) == ["screen", "careful", "tie1", "tie2"]
    assert result.winner == b
    timed = {t.config: t for t in result.careful}
    assert len(timed[a].medians) == 3 and timed[a].median_ms == pytest.approx(0.52)


def test_a_config_failing_a_retime_is_dropped(rng):
    problem = QWEN.problems()[4]
    plan = plan_problem(problem, H100, "default", (16384,), FAST)
    a, b = plan.screen[16384][:2]

    class Flaky(FakeTimer):
        def measure(self, problem, tokens, cfg, stage):
            if cfg == a and stage == "tie1":
                self.calls.append((cfg, tokens, stage))
                return SimpleNamespace(ok=False, error="the worker died", median_ms=None, spread_ms=None,
                                       rel_error=None)
            return super().measure(problem, tokens, cfg, stage)

    timer = Flaky(rng.getrandbits(32), times={a: 0.3, b: 0.301})
    result = search_bucket(problem, 16384, plan.screen[16384], plan.default, timer, FAST)
    assert result.winner == b and a.short() in result.failed


def test_every_candidate_failing_leaves_no_winner(rng):
    problem = QWEN.problems()[5]
    plan = plan_problem(problem, H100, "default", (1024,), FAST)
    everything = set(plan.compile)
    result = search_bucket(problem, 1024, plan.screen[1024], plan.default, FakeTimer(1, wrong=everything), FAST)
    assert not result.ok and result.winner is None and result.tflops is None and result.speedup is None


def test_exhaustive_search_finds_the_brute_force_optimum(rng):
    problem = QWEN.problems()[2]
    plan = plan_problem(problem, H100, "default", (4096,), EXHAUSTIVE)
    timer = FakeTimer(rng.getrandbits(32))
    result = search_bucket(problem, 4096, plan.screen[4096], plan.default, timer, EXHAUSTIVE)
    legal = candidates(problem, H100, "default", num_tokens=4096) + neighbours(problem, plan.default, H100, 4096)
    best = min(legal + [plan.default], key=lambda c: timer.true_ms(c, 4096))
    assert result.winner == timer.decided(best, plan.default, 4096)


def test_fast_search_on_a_cost_model_world_lands_near_the_exhaustive_best(rng):
    # A world where times follow the cost model with ±5% noise: the fast search's pick must be
    # within a few percent of the exhaustive optimum, or the default within the noise floor of the
    # pick it kept out (the GPU benchmark checks the real world).
    problem = QWEN.problems()[0]
    salt = rng.getrandbits(32)

    class Modelled(FakeTimer):
        def true_ms(self, cfg, tokens):
            noise = super().true_ms(cfg, tokens) - 1.5  # [-0.5, 0.5)
            return estimate_ms(problem, cfg, tokens, H100) * (1 + 0.1 * noise)

    for tokens in (1024, 16384):
        fast_plan = plan_problem(problem, H100, "default", (tokens,), FAST)
        full_plan = plan_problem(problem, H100, "default", (tokens,), EXHAUSTIVE)
        fast = search_bucket(problem, tokens, fast_plan.screen[tokens], fast_plan.default, Modelled(salt), FAST)
        best = search_bucket(problem, tokens, full_plan.screen[tokens], full_plan.default, Modelled(salt), EXHAUSTIVE)
        assert fast.median_ms <= best.median_ms * 1.05 / (1 - NOISE_FLOOR)


def _measured_world(name: str):
    """(device, tokens, {problem key: {config: ms}}) of a sweep journal's screen medians."""
    import json
    from pathlib import Path

    data = json.loads((Path(__file__).parent / "data" / name).read_text())
    worlds = {}
    for key, rows in data["problems"].items():
        flags = {"TMA_LOAD", "TMA_STORE", "GATHER_COPY", "WARP_SPEC"}
        worlds[key] = {KernelConfig(**{f: bool(v) if f in flags else v for f, v in zip(data["fields"], row[:-1])}):
                       row[-1] for row in rows}
    return DeviceInfo.from_dict(data["device"]), data["tokens"], worlds


def test_fast_search_on_measured_h200_times_finds_the_exhaustive_best():
    # The H200's own screen times of every config of the default space (gpt-oss-120b's two dW at
    # 4096 tokens, ~128 rows per expert): the fast policy compiles 56 of ~800 and must land within
    # 1% of the exhaustive sweep's best. (Before the cost model counted TMA descriptors per tile
    # and spilled accumulators, it landed 7.5% and 4% off, on one program per SM.)
    device, tokens, worlds = _measured_world("gpt_oss_120b_dw_h200_4096.json")
    problems = {p.key: p for p in load_preset("gpt-oss-120b").problems()}
    for key, world in worlds.items():
        problem = problems[key]
        plan = plan_problem(problem, device, "default", (tokens,), FAST)
        # Configs outside the measured space (the default's 256-deep K block) have no time: they fail.
        timer = FakeTimer(0, times=world, crash={c for c in plan.compile if c not in world})
        result = search_bucket(problem, tokens, plan.screen[tokens], plan.default, timer, FAST)
        assert result.winner in world
        assert world[result.winner] <= 1.01 * min(world.values()), (key, result.winner.short())
