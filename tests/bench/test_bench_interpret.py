"""The benchmark's cases and runner in Triton's CPU interpreter (float32, tiny shapes): every
``torch._grouped_mm`` path computes what moe-tune's kernel computes (so the baseline times the
same work), dense matmuls carry the same FLOPs, the runner times each variant once, reuses the
default's time when the tuned config is the default, says where a cached config came from, and
builds and times the experts block against transformers (or says why not) — eager and under
torch.compile (``aot_eager``: Inductor's CPU code generation is not what these tests are about) —,
its host overhead, and training steps of a tiny causal LM in every mode; a failing implementation
is a row error, never the end of the run."""

from __future__ import annotations

import importlib.util
import random

import pytest
import torch

from moe_tune import runtime
from moe_tune.bench import block as block_mod
from moe_tune.bench.gemms import bench_gemms, build_cases, relative_difference
from moe_tune.bench.results import Timing
from moe_tune.bench.isolation import describe_error
from moe_tune.bench.run import INTERPRETER_COMPILE_BACKEND, BenchOptions, planned_steps, run_bench
from moe_tune.cache import CacheFile, CacheStore
from moe_tune.cache.testing import random_measurement
from moe_tune.device import INTERPRETER_DEVICE, query_device
from moe_tune.models import find_preset
from moe_tune.problem import MoeShape
from moe_tune.space import candidates, default_config

pytestmark = pytest.mark.filterwarnings("ignore::moe_tune.errors.CacheWarning")

TINY = find_preset("tiny").shape  # E=4, H=64, I=32, k=2
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


class CountingTimer:
    """Runs ``fn`` once per measurement (so every path executes) and returns 1, 2, 3... ms."""

    def __init__(self):
        self.calls = 0

    def __call__(self, fn, grad_to_none=None) -> Timing:
        fn()
        self.calls += 1
        return Timing.from_samples([float(self.calls)])

    def versus(self, fns, rounds=4) -> list[Timing]:
        self.versus_calls = getattr(self, "versus_calls", 0) + 1
        return [self(fn) for fn in fns]

    def describe(self) -> dict:
        return {"timer": "counting (test)"}


class RecordingProgress:
    def __init__(self):
        self.total, self.begun, self.ended, self.notes, self.finished = None, [], 0, [], False

    def start(self, total, *, task=None, label=""):
        self.total = total

    def begin(self, what, *, task=None):
        self.begun.append(what)

    def end(self, *, task=None):
        self.ended += 1

    def finish(self, *, task=None):
        self.finished = True

    def note(self, message):
        self.notes.append(message)


@pytest.mark.parametrize("shape, tokens", [
    (TINY, 16),  # the tiny preset
    (MoeShape(E=8, H=64, I=48, topk=3), 9),  # 2I = 96 and k = 3: masked columns, odd row counts
    (MoeShape(E=16, H=32, I=32, topk=1), 5),  # more experts than rows: most experts empty
    (MoeShape(E=4, H=64, I=48, topk=2, layout="gpt_oss"), 9),  # [E, K, N] weights, sort launches
], ids=["tiny", "masked", "empty-experts", "gpt-oss"])
def test_grouped_mm_paths_compute_what_the_kernels_compute(device, shape, tokens):
    info = query_device(device)
    tol = 1e-5 if info.is_interpreter else 5e-3  # float32 runs the GPU's MMA in TF32
    for case in build_cases(shape, tokens, "float32", device, seed=3):
        reference = case.grouped_mm()
        legal = candidates(case.problem, info, "interpret") if info.is_interpreter else []
        for cfg in [default_config(case.problem, info), *legal[-1:]]:  # the default and a TMA config
            out = case.moe_tune(cfg)()
            assert out.shape == reference.shape, case.problem.key
            assert relative_difference(out, reference) < tol, (case.problem.key, cfg.short())


@pytest.mark.parametrize("shape", [TINY, MoeShape(E=4, H=64, I=48, topk=2, layout="gpt_oss")], ids=["tiny", "gpt-oss"])
def test_dense_ceiling_has_the_same_flops(shape):
    for case in build_cases(shape, 16, "float32", "cpu"):
        m, k, n = case.dense_mnk
        assert 2 * m * n * k == case.problem.flops(16), case.problem.key


def test_relative_difference_catches_nan():
    ref = torch.ones(4, 4)
    out = ref.clone()
    out[1, 2] = float("nan")
    assert relative_difference(out, ref) == float("inf")
    assert relative_difference(ref * 1.01, ref) == pytest.approx(0.01, rel=1e-3)


def test_without_a_cache_tuned_is_the_default_timed_once(device):
    timer, progress = CountingTimer(), RecordingProgress()
    rows = bench_gemms(TINY, 16, dtype="float32", device=device, timer=timer, progress=progress)
    assert [r.problem for r in rows] == TINY.problems("float32")
    assert timer.calls == 6 * 3  # grouped_mm, default, dense; tuned reuses the default's time
    assert len(progress.begun) == progress.ended == 6 * 4
    for row in rows:
        assert row.tuned_from.source == "default" and row.tuned_is_default
        assert row.timings["tuned"] is row.timings["default"]
        assert len({row.timings[v].ms for v in ("grouped_mm", "default", "dense")}) == 3
        assert not row.failed_checks


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter run")
def test_a_cached_config_is_named_and_timed(tmp_path):
    problem = TINY.problems("float32")[0]  # up forward
    default = default_config(problem, INTERPRETER_DEVICE)
    tuned = next(c for c in reversed(candidates(problem, INTERPRETER_DEVICE, "interpret")) if c != default)
    cache = CacheFile.new(INTERPRETER_DEVICE)
    cache.add(problem, 32, tuned, random_measurement(random.Random(0)))
    CacheStore(tmp_path / "cache").write(cache)
    runtime.set_cache_dir(tmp_path / "cache")

    timer = CountingTimer()
    rows = bench_gemms(TINY, 16, dtype="float32", device="cpu", timer=timer)
    assert timer.calls == 6 * 3 + 1
    assert timer.versus_calls == 1  # tuned and default timed head to head, only where they differ
    row = rows[0]
    assert row.tuned_config == tuned and row.default_config == default
    assert (row.tuned_from.source, row.tuned_from.bucket) == ("explicit", 32)
    assert row.tuned_from.path.endswith(".json")
    assert row.timings["tuned"] != row.timings["default"]
    assert row.errors["tuned"] < 1e-5
    assert all(r.tuned_from.source == "default" for r in rows[1:])


def tiny_options(**overrides) -> BenchOptions:
    preset = find_preset("tiny")
    fields = dict(model="tiny", shape=preset.shape, family=preset.family, tokens=(16,), dtype="float32",
                  device="cpu", compile_backend=INTERPRETER_COMPILE_BACKEND, host_tokens=8, host_iterations=1,
                  host_repeats=1, step_steps=1, step_warmup=1)
    return BenchOptions(**{**fields, **overrides})


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter run")
def test_run_bench_whole_report_in_the_interpreter():
    options = tiny_options(tokens=(8, 16), seed=5, compile=False)
    timer, progress = CountingTimer(), RecordingProgress()
    saved = []
    report = run_bench(options, timer, progress, checkpoint=saved.append)
    assert report.environment["card"] == "triton-interpreter (CPU)"
    assert report.environment["triton"] and report.environment["torch"] == torch.__version__
    assert [r.tokens for r in report.gemms] == [8] * 6 + [16] * 6
    assert all(set(r.timings) == {"tuned", "default", "grouped_mm", "dense"} for r in report.gemms)
    assert progress.total == planned_steps(options, block_runs=HAS_TRANSFORMERS, host_runs=HAS_TRANSFORMERS)
    assert progress.ended == progress.total and progress.finished
    # A checkpoint after each token count of each section, the last one the report itself.
    assert saved[-1] == report and len(saved) == (5 if HAS_TRANSFORMERS else 2)
    assert saved[0].gemms == report.gemms[:6] and "did not finish" in str(saved[0].block.skipped)
    assert any("moe-tune sweep --model tiny --dtype float32" in n for n in progress.notes)
    assert not report.failed_checks
    if HAS_TRANSFORMERS:
        assert report.block.skipped is None
        assert [(r.tokens, r.implementation) for r in report.block.rows] == [
            (8, "grouped_mm"), (8, "moe_tune"), (16, "grouped_mm"), (16, "moe_tune")]
        ours = report.block.rows[1]
        assert set(ours.errors) == {"out", "hidden", "top_k_weights", "gate_up_proj", "down_proj"}
        assert max(ours.errors.values()) < 1e-4
        assert ours.peak_mib is None  # CUDA only
        assert report.host.tokens == 8 and [r.implementation for r in report.host.rows] == ["grouped_mm", "moe_tune"]
        # host (the held loop) and wall (the unheld one) are separate loops: no order between them
        assert all(r.host.ms > 0 and r.wall.ms > 0 and r.kernels is None for r in report.host.rows)
    else:
        assert "transformers is not installed" in report.block.skipped
    assert report.step.skipped == "not requested"


@pytest.mark.skipif(torch.cuda.is_available() or not HAS_TRANSFORMERS, reason="interpreter run with transformers")
def test_block_and_host_under_torch_compile():
    options = tiny_options(gemms=False)
    report = run_bench(options, CountingTimer())
    labels = ["grouped_mm", "grouped_mm+compile", "moe_tune", "moe_tune+compile"]
    assert [r.implementation for r in report.block.rows] == labels
    for row in report.block.rows[1:]:
        assert row.error is None and row.note is None, row  # fullgraph=True holds for both
        assert set(row.errors) == {"out", "hidden", "top_k_weights", "gate_up_proj", "down_proj"}
        assert max(row.errors.values()) < 1e-4, row.errors
    assert [r.implementation for r in report.host.rows] == labels
    assert all(r.error is None for r in report.host.rows)
    assert report.settings["compile"]["backend"] == "aot_eager"
    assert report.settings["compile"]["gemm"].startswith("skipped: torch._grouped_mm compiles for bfloat16 only")
    assert not report.failed_checks and not report.row_errors


@pytest.mark.skipif(torch.cuda.is_available() or not HAS_TRANSFORMERS, reason="interpreter run with transformers")
def test_a_failing_implementation_is_a_row_error(rng):
    # moe-tune refuses a GELU MLP (it implements SwiGLU); transformers' grouped_mm, whose act_fn was
    # built at construction, still runs: the natural way to make one implementation fail.
    shape = find_preset("tiny").shape
    block = block_mod.build_block(shape, "float32", "cpu", seed=rng.randrange(100))
    block.experts.config.hidden_act = "gelu"
    rows = block_mod.bench_block(block, shape, 8, dtype="float32", device="cpu", timer=CountingTimer(),
                                 compile_block=True, compile_backend=INTERPRETER_COMPILE_BACKEND)
    by_label = {r.implementation: r for r in rows}
    assert by_label["grouped_mm"].error is None and by_label["grouped_mm+compile"].error is None
    for label in ("moe_tune", "moe_tune+compile"):
        assert by_label[label].fwd is None and "activation 'gelu'" in by_label[label].error


def test_describe_error_keeps_dynamo_explanations():
    exc = RuntimeError("RuntimeError when making fake tensor call\n  Explanation: Dynamo failed to run FX node\n"
                       "  Hint: ...")
    assert describe_error(exc) == ("RuntimeError: RuntimeError when making fake tensor call "
                                   "(Dynamo failed to run FX node)")
    assert describe_error(ValueError("x" * 1000)).endswith("...") and len(describe_error(ValueError("x" * 1000))) == 240
    assert describe_error(KeyError()) == "KeyError"


def test_block_skip_reasons(monkeypatch):
    from moe_tune.models import find_preset

    # Every concatenated-layout preset builds the Qwen3-MoE experts with its shapes; gpt-oss does not.
    for name in ("mixtral-8x7b", "deepseek-v2-lite", "qwen3-next-80b-a3b", "olmoe-1b-7b"):
        assert block_mod.block_skip_reason(find_preset(name).shape, name) is None
    assert "gpt_oss layout" in block_mod.block_skip_reason(find_preset("gpt-oss-20b").shape, "gpt-oss-20b")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else real(name, *a))
    assert block_mod.block_skip_reason(find_preset("qwen3-30b-a3b").shape, "qwen3-30b-a3b") == \
        "transformers is not installed (pip install 'transformers>=5')"


def test_no_block_means_not_requested():
    report = run_bench(tiny_options(tokens=(8,), gemms=False, block=False, host=False), CountingTimer())
    assert report.gemms == () and report.block.skipped == report.host.skipped == "not requested"
    assert report.step.skipped == "not requested"
