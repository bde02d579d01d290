"""What a worker does with one candidate (moe_tune/tuning/candidate.py, moe_tune/tuning/cases.py),
run in this process under Triton's interpreter: the correctness gate (NaN-poisoned outputs, a
perturbed result rejected), the head to head of two configs, compile-only launches, and the
launch plans."""

from __future__ import annotations

import math

import pytest
import torch

from moe_tune.device import INTERPRETER_DEVICE
from moe_tune.errors import InvalidInputError
from moe_tune.models import load_preset
from moe_tune.problem import KernelConfig
from moe_tune.space import candidates, default_config
from moe_tune.ops import launch
from moe_tune.tuning.candidate import GATE_TOLERANCE, Bench, LaunchPlan, tiny_tokens
from moe_tune.tuning.cases import Case
from moe_tune.tuning.protocol import Versus, measure_request, versus_request
from moe_tune.tuning.routing_spec import RoutingSpec
from tuning_faults import FaultyBench

TINY = load_preset("tiny")


# -- helpers --------------------------------------------------------------------------------------


def test_tiny_tokens_keep_triton_specialisation():
    def klass(t, k):
        return (t % 16 == 0, t * k % 16 == 0, t == 1, t * k == 1)

    for buckets, k in (([1024, 4096], 8), ([1000, 1024], 8), ([1, 33, 64], 1), ([7, 32], 2)):
        tiny = tiny_tokens(buckets, k)
        assert {klass(t, k) for t in tiny} == {klass(t, k) for t in buckets}
        assert max(tiny) <= 64


def test_launch_plans():
    plan = LaunchPlan(target_ms=100.0, min_launches=10, max_launches=50)
    assert plan.launches(0.001) == 50 and plan.launches(50.0) == 10 and plan.launches(4.0) == 25


# -- the gate -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_gate_passes_correct_configs_and_rejects_a_perturbed_result(dtype, rng):
    bench = Bench()
    problems = TINY.problems(dtype)
    for problem in rng.sample(problems, 3):
        cfg = rng.choice(candidates(problem, INTERPRETER_DEVICE, "interpret", num_tokens=32))
        request = measure_request(problem, 32, RoutingSpec(), rng.getrandbits(31), cfg, "screen")
        good = bench.handle(request)
        assert good["ok"], (problem.key, cfg.short(), good)
        assert good["rel_error"] <= GATE_TOLERANCE[dtype] and good["median_ms"] > 0
        bad = FaultyBench({cfg.short(): "corrupt"}).handle(request)
        assert not bad["ok"] and bad["error"].startswith("wrong result"), bad


def test_gate_sees_an_output_the_kernel_never_wrote(monkeypatch):
    # A config whose kernel writes nothing leaves the NaN poison in place: the gate must fail it.
    problem = TINY.problems("float32")[0]
    case = Case(problem, 32, RoutingSpec(), 0, "cpu")
    out = case.new_output()
    with launch.compile_only():  # launches compile (here: nothing) and write nothing
        result = case.launch(default_config(problem, INTERPRETER_DEVICE), out)
    from moe_tune.reference import relative_error

    assert not relative_error(result, case.reference) <= GATE_TOLERANCE["float32"]
    if result.data_ptr() == out.data_ptr():  # launchers that write into `out`: the poison is still there
        assert torch.isnan(out).all() and math.isinf(relative_error(result, case.reference))


def test_config_errors_are_failures_not_crashes():
    problem = TINY.problems("float32")[3]  # down forward: scattered, so no TMA store
    cfg = KernelConfig(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=4, num_warps=1, num_stages=1, TMA_STORE=True)
    reply = Bench().handle({"op": "measure", "problem": problem.to_dict(), "tokens": 32, "seed": 0,
                            "routing": {"kind": "uniform", "skew": 0.0, "path": None}, "config": cfg.to_dict()})
    assert not reply["ok"] and "TMA_STORE" in reply["error"]


# -- head to head --------------------------------------------------------------------------------


def test_versus_times_both_configs_and_gates_each(rng):
    problem = rng.choice(TINY.problems("float32"))
    default = default_config(problem, INTERPRETER_DEVICE)
    challenger = rng.choice([c for c in candidates(problem, INTERPRETER_DEVICE, "interpret", num_tokens=32)
                             if c != default])
    request = versus_request(problem, 32, RoutingSpec(), rng.getrandbits(31), challenger, default, rounds=2)
    versus = Versus.from_dict(Bench().handle(request))
    for outcome in (versus.challenger, versus.default):
        assert outcome.ok and outcome.samples == 2 and outcome.median_ms > 0  # one launch a round
        assert outcome.rel_error <= GATE_TOLERANCE["float32"]
    # A challenger that computes wrong numbers is failed by the gate; the default is still timed.
    versus = Versus.from_dict(FaultyBench({challenger.short(): "corrupt"}).handle(request))
    assert not versus.challenger.ok and versus.challenger.error.startswith("wrong result")
    assert versus.default.ok


# -- compile-only launches ------------------------------------------------------------------------


def test_precompile_binds_the_same_arguments_as_a_launch(monkeypatch):
    """The compile workers must build the binary the timing run looks up: same constexprs, same
    argument kinds, no launch of a GEMM kernel (building the inputs may launch the routing's)."""
    from triton.runtime.interpreter import InterpretedFunction

    from moe_tune.kernels import grouped_mm

    gemms = {grouped_mm.grouped_mm_kernel.fn, grouped_mm.grouped_mm_dw_kernel.fn}
    seen = []
    real_run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        if self.fn in gemms:
            seen.append((warmup, [type(a).__name__ if isinstance(a, torch.Tensor) else a for a in args],
                         {k: v for k, v in kwargs.items()}))
        return real_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording_run)
    bench = Bench()
    for problem in TINY.problems("float32"):
        seen.clear()
        cfg = default_config(problem, INTERPRETER_DEVICE)
        reply = bench.handle({"op": "compile", "problem": problem.to_dict(), "config": cfg.to_dict(), "tokens": [32]})
        assert reply["ok"], reply
        compiled = [s for s in seen if s[0]]
        assert compiled and all(s[0] for s in seen), "precompile must never launch"
        seen.clear()
        Case(problem, 32, RoutingSpec(), 0, "cpu", with_reference=False).launch(cfg)
        launched = [s for s in seen if not s[0]]
        assert len(launched) == len(compiled)
        for (_, c_args, c_kwargs), (_, l_args, l_kwargs) in zip(compiled, launched):
            assert c_kwargs == l_kwargs  # every constexpr and launch option
            assert [type(a) for a in c_args] == [type(a) for a in l_args]


def test_compile_only_stacks_cost_one_expert_and_specialise_like_the_launch(monkeypatch, rng):
    """The compile workers' weight stacks and dW outputs are one expert's memory seen E times
    (``problems.expanded``); Triton's sm90 specialisation of every argument (the key of the binary
    the timing worker looks up) is still the launch's, for both layouts and a LoRA factor."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction, create_function_from_signature

    from moe_tune.kernels import grouped_mm
    from moe_tune.problem import MoeShape

    backend = make_backend(GPUTarget("cuda", 90, 32))
    gemms = {grouped_mm.grouped_mm_kernel.fn, grouped_mm.grouped_mm_dw_kernel.fn}
    binders = {fn: create_function_from_signature(JITFunction(fn).signature, JITFunction(fn).params, backend)
               for fn in gemms}
    seen = []
    real_run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        if self.fn in gemms:
            options = {k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages")}
            meta = {k: v for k, v in kwargs.items() if k not in options}
            seen.append(binders[self.fn](*args, **meta, **options)[1])
            if warmup:
                return None  # compile-only: nothing to run (the stand-in stacks hold no data)
        return real_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording_run)
    E = rng.choice((4, 8))
    shapes = [MoeShape(E=E, H=64, I=48, topk=2), MoeShape(E=E, H=64, I=48, topk=2, layout="gpt_oss")]
    problems = [p for s in shapes for p in s.problems("float32")]
    problems += [shapes[0].lora_problems(16, "float32")[rng.choice(("up_a.dw", "down_b.forward", "up_b.dx"))]]
    for problem in problems:
        cfg = default_config(problem, INTERPRETER_DEVICE)
        stand_in = Case(problem, 32, RoutingSpec(), 0, "cpu", compile_only=True)
        stacks = [t for t in (stand_in.inputs.get("w"), stand_in.new_output()) if t is not None and t.dim() == 3]
        assert stacks and all(t.stride(0) == 0 and t.untyped_storage().nbytes() * E == t.numel() * t.element_size()
                              for t in stacks), problem.key
        seen.clear()
        with launch.compile_only():
            stand_in.launch(cfg)
        compiled = list(seen)
        seen.clear()
        Case(problem, 32, RoutingSpec(), 0, "cpu", with_reference=False).launch(cfg)
        assert compiled and compiled == seen, problem.key
    with pytest.raises(InvalidInputError, match="contiguous"):  # outside compile_only, a stand-in is refused
        stand_in = Case(problems[0], 32, RoutingSpec(), 0, "cpu", compile_only=True)
        stand_in.launch(default_config(problems[0], INTERPRETER_DEVICE))
