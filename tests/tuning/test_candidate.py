"""What a worker does with one candidate (moe_tune/tuning/timing.py), run in this process under
Triton's interpreter: routing specs and traces, the correctness gate (NaN-poisoned outputs, a
perturbed result rejected), compile-only launches, and the small statistics helpers."""

from __future__ import annotations

import math

import numpy
import pytest
import torch

from moe_tune.device import INTERPRETER_DEVICE
from moe_tune.errors import InvalidInputError
from moe_tune.models import load_preset
from moe_tune.problem import KernelConfig
from moe_tune.space import candidates, default_config
from moe_tune.tuning.timing import (
    GATE_TOLERANCE,
    Bench,
    Case,
    LaunchPlan,
    RoutingSpec,
    _kernels_compile_only,
    summarise,
    tiny_tokens,
)

TINY = load_preset("tiny")


# -- routing specs --------------------------------------------------------------------------------


def test_routing_specs_parse():
    assert RoutingSpec.parse("uniform") == RoutingSpec()
    assert RoutingSpec.parse("zipf:1.2") == RoutingSpec("zipf", skew=1.2)
    assert str(RoutingSpec.parse("zipf:1.2")) == "zipf:1.2"
    for bad in ("zipf", "zipf:-1", "zipf:nan", "trace:", "gaussian", "uniform:3"):
        with pytest.raises(InvalidInputError, match="--routing"):
            RoutingSpec.parse(bad)


def test_random_routing_is_reproducible_and_skew_skews(rng):
    seed = rng.getrandbits(31)
    a = RoutingSpec().top_k_ids(512, 16, 2, seed)
    assert torch.equal(a, RoutingSpec().top_k_ids(512, 16, 2, seed))
    assert a.shape == (512, 2) and int(a.min()) >= 0 and int(a.max()) < 16
    skewed = RoutingSpec("zipf", skew=2.0).top_k_ids(512, 16, 2, seed)
    counts = torch.bincount(skewed.flatten(), minlength=16)
    assert counts[:4].sum() > counts[-4:].sum() * 3


@pytest.mark.parametrize("suffix", [".pt", ".npy"])
def test_traces_load_cycle_and_validate(tmp_path, rng, suffix):
    ids = torch.randint(0, 8, (rng.randint(5, 40), 2))
    path = tmp_path / f"trace{suffix}"
    if suffix == ".pt":
        torch.save(ids, path)
    else:
        numpy.save(path, ids.numpy().astype(numpy.int32))
    spec = RoutingSpec.parse(f"trace:{path}")
    got = spec.top_k_ids(100, 8, 2, seed=0)
    assert got.shape == (100, 2)
    assert torch.equal(got[: len(ids)], ids) and torch.equal(got[len(ids): 2 * len(ids)][: 100 - len(ids)],
                                                              ids[: min(len(ids), 100 - len(ids))])
    assert spec.identity().startswith("trace:sha256=")
    with pytest.raises(InvalidInputError, match="k=2"):
        spec.load_trace(8, topk=4)
    with pytest.raises(InvalidInputError, match=r"outside \[0, 4\)"):
        spec.load_trace(4, topk=2)


def test_bad_traces_are_clear_errors(tmp_path):
    floats = tmp_path / "floats.pt"
    torch.save(torch.rand(4, 2), floats)
    with pytest.raises(InvalidInputError, match="int tensor"):
        RoutingSpec.parse(f"trace:{floats}").load_trace(8, 2)
    with pytest.raises(InvalidInputError, match="does not exist"):
        RoutingSpec.parse(f"trace:{tmp_path / 'missing.pt'}").load_trace(8, 2)
    junk = tmp_path / "junk.npy"
    junk.write_bytes(b"not numpy")
    with pytest.raises(InvalidInputError, match="cannot read"):
        RoutingSpec.parse(f"trace:{junk}").load_trace(8, 2)


# -- helpers --------------------------------------------------------------------------------------


def test_tiny_tokens_keep_triton_specialisation():
    def klass(t, k):
        return (t % 16 == 0, t * k % 16 == 0, t == 1, t * k == 1)

    for buckets, k in (([1024, 4096], 8), ([1000, 1024], 8), ([1, 33, 64], 1), ([7, 32], 2)):
        tiny = tiny_tokens(buckets, k)
        assert {klass(t, k) for t in tiny} == {klass(t, k) for t in buckets}
        assert max(tiny) <= 64


def test_summarise_and_launch_plans(rng):
    samples = [rng.uniform(1.0, 2.0) for _ in range(rng.randint(5, 50))]
    median, spread = summarise(samples)
    assert min(samples) <= median <= max(samples) and 0 <= spread <= max(samples) - min(samples)
    plan = LaunchPlan(target_ms=100.0, min_launches=10, max_launches=50)
    assert plan.launches(0.001) == 50 and plan.launches(50.0) == 10 and plan.launches(4.0) == 25


# -- the gate -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_gate_passes_correct_configs_and_rejects_a_perturbed_result(dtype, rng):
    bench = Bench()
    problems = TINY.problems(dtype)
    for problem in rng.sample(problems, 3):
        cfg = rng.choice(candidates(problem, INTERPRETER_DEVICE, "interpret", num_tokens=32))
        request = {"op": "measure", "problem": problem.to_dict(), "tokens": 32, "seed": rng.getrandbits(31),
                   "routing": {"kind": "uniform", "skew": 0.0, "path": None}, "config": cfg.to_dict(), "stage": "screen"}
        good = bench.handle(request)
        assert good["ok"], (problem.key, cfg.short(), good)
        assert good["rel_error"] <= GATE_TOLERANCE[dtype] and good["median_ms"] > 0
        bench.faults = {cfg.short(): "corrupt"}
        bad = bench.handle(request)
        bench.faults = {}
        assert not bad["ok"] and bad["error"].startswith("wrong result"), bad


def test_gate_sees_an_output_the_kernel_never_wrote(monkeypatch):
    # A config whose kernel writes nothing leaves the NaN poison in place: the gate must fail it.
    problem = TINY.problems("float32")[0]
    case = Case(problem, 32, RoutingSpec(), 0, "cpu")
    out = case.new_output()
    with _kernels_compile_only():  # launches compile (here: nothing) and write nothing
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


# -- compile-only launches ------------------------------------------------------------------------


def test_precompile_binds_the_same_arguments_as_a_launch(monkeypatch):
    """The compile workers must build the binary the timing run looks up: same constexprs, same
    argument kinds, no launch."""
    from triton.runtime.interpreter import InterpretedFunction

    seen = []
    real_run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
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
