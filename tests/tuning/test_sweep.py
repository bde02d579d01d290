"""The sweep end to end under Triton's interpreter (moe_tune/tuning/sweep.py and the modules it
drives): worker processes, correctness gate, journal and cache write, with faults injected into
named configs (``tuning_faults``). Timings are wall clock here and mean nothing; what is checked is
where every candidate went. With a deterministic timer instead of the workers: the sweep never
keeps a config that did not beat the default head to head."""

from __future__ import annotations

import pytest

from moe_tune.cache import CacheStore
from moe_tune.device import INTERPRETER_DEVICE
from moe_tune.errors import InvalidInputError, NoGPUError
from moe_tune.models import resolve_model
from moe_tune.tuning.journal import read_records
from moe_tune.tuning.devices import detect_device
from moe_tune.tuning.options import SweepOptions, select_problems
from moe_tune.tuning.routing_spec import RoutingSpec
from moe_tune.tuning.search import INTERPRETER, plan_problem
from moe_tune.tuning.sweep import run_sweep
from tuning_faults import faulty

TINY = resolve_model("tiny")


def test_faulty_candidates_are_recorded_and_never_written(tmp_path, rng):
    options = SweepOptions(model=TINY, tokens=(32,), passes=("forward",), gemms=("up",), interpret=True,
                           cache_dir=tmp_path, seed=rng.getrandbits(31), candidate_timeout_s=8.0).resolved()
    (problem,) = select_problems(options)
    plan = plan_problem(problem, INTERPRETER_DEVICE, "interpret", (32,), INTERPRETER)
    wrong, crash, hang = plan.screen[32][:3]
    faults = {wrong.short(): "corrupt", crash.short(): "crash", hang.short(): "hang"}

    report = run_sweep(options, bench=faulty(faults))

    assert report.complete and not report.failed_buckets
    (bucket,) = report.results[problem]
    assert bucket.winner not in (wrong, crash, hang)
    assert bucket.failed[wrong.short()].startswith("wrong result")
    assert "died" in bucket.failed[crash.short()] and "no answer within 8 s" in bucket.failed[hang.short()]
    assert report.stats.worker_restarts == 2

    # Every outcome reached the journal, fsynced, before the search used it.
    measures = [r for r in read_records(report.journal_path) if r["type"] == "measure"]
    by_config = {r["config_short"]: r["outcome"] for r in measures}
    assert not by_config[wrong.short()]["ok"] and not by_config[crash.short()]["ok"]

    # The cache holds the gated winner, with its provenance.
    cache = CacheStore(tmp_path).read(INTERPRETER_DEVICE, _triton())
    entry = cache.get(problem, 32)
    assert entry.config == bucket.winner and entry.measurement.correct
    assert entry.measurement.candidates == bucket.timed
    assert cache.provenance.writes[-1].sweep_seconds is not None


def _triton() -> str:
    from moe_tune.cache.software import triton_version

    return triton_version()


def test_budget_stops_before_measuring_and_resume_finishes(tmp_path):
    options = SweepOptions(model=TINY, tokens=(32,), passes=("dw",), gemms=("down",), interpret=True,
                           cache_dir=tmp_path, budget_s=1e-6)
    stopped = run_sweep(options)
    assert not stopped.complete and "budget" in stopped.stopped and stopped.cache_path is None
    assert stopped.stats.measurements == 0

    options.budget_s, options.resume = None, True
    finished = run_sweep(options)
    assert finished.complete and finished.cache_path is not None


def test_compile_pool_builds_candidates_ahead_of_timing(tmp_path):
    # Under the interpreter a compile is a no-op launch, but the path is the GPU's: every
    # candidate goes through a pool worker (a spawned process) before the timing worker sees it.
    options = SweepOptions(model=TINY, tokens=(32,), passes=("dx",), gemms=("up",), interpret=True,
                           cache_dir=tmp_path, compile_workers=1)
    report = run_sweep(options)
    assert report.complete
    stats = report.stats.to_dict()
    assert stats["compile_workers"] == 1 and stats["compiles"] >= 4 and stats["compile_failures"] == 0
    assert stats["compile_wall_s"] > 0
    compiles = [r for r in read_records(report.journal_path) if r["type"] == "compile"]
    assert len(compiles) == stats["compiles"] and all(r["ok"] for r in compiles)


def test_options_are_validated_before_anything_runs(tmp_path):
    with pytest.raises(InvalidInputError, match="bfloat16 wrongly"):
        SweepOptions(model=TINY, interpret=True, dtype="bfloat16").resolved()
    with pytest.raises(InvalidInputError, match="use --model tiny"):
        SweepOptions(model=resolve_model("qwen3-30b-a3b"), interpret=True).resolved()
    with pytest.raises(InvalidInputError, match="--passes"):
        SweepOptions(model=TINY, passes=("backward",)).resolved()
    with pytest.raises(InvalidInputError, match="--space"):
        SweepOptions(model=TINY, space="huge").resolved()
    with pytest.raises(InvalidInputError, match="does not exist"):
        SweepOptions(model=TINY, routing=RoutingSpec.parse(f"trace:{tmp_path / 'none.pt'}")).resolved()
    resolved = SweepOptions(model=TINY, interpret=True).resolved()
    assert resolved.dtype == "float32" and resolved.space == "interpret" and resolved.tokens == (32, 64)
    assert SweepOptions(model=TINY, exhaustive=True).resolved().policy.screen is None


def test_no_gpu_is_a_clear_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(NoGPUError, match="--interpret"):
        detect_device(interpret=False)
