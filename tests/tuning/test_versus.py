"""The winner against the default, head to head (moe_tune/tuning/versus.py): interleaved rounds, the
decision rule (the default stays unless beaten beyond the noise), its place in a bucket's settle
and in the sweep's results. Times come from injected timers: what is tested is the decision, not
a GPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from moe_tune.device import INTERPRETER_DEVICE
from moe_tune.models import load_preset, resolve_model
from moe_tune.space import default_config
from moe_tune.tuning.options import SweepOptions
from moe_tune.tuning.protocol import Outcome, Versus
from moe_tune.tuning.results import BucketResult
from moe_tune.tuning.search import INTERPRETER, SearchPolicy, plan_problem, settle_bucket
from moe_tune.tuning.sweep import run_sweep
from moe_tune.tuning.testing import HashTimer
from moe_tune.tuning.versus import NOISE_FLOOR, decide, head_to_head

TINY = load_preset("tiny")
PROBLEM = TINY.problems("float32")[0]
DEFAULT = default_config(PROBLEM, INTERPRETER_DEVICE)
CHALLENGER = plan_problem(PROBLEM, INTERPRETER_DEVICE, "interpret", (32,), INTERPRETER).compile[1]


def timed(median: float, spread: float) -> Outcome:
    return Outcome(ok=True, median_ms=median, spread_ms=spread, samples=40, rel_error=1e-4)


def test_rounds_interleave_and_alternate_who_goes_first():
    calls = []

    def timer(run):
        calls.append(run())
        return [float(len(calls))]

    samples = head_to_head([lambda: "A", lambda: "B"], timer, rounds=4)
    assert calls == ["A", "B", "B", "A", "A", "B", "B", "A"]  # drift over time favours neither
    assert samples == [[1.0, 4.0, 5.0, 8.0], [2.0, 3.0, 6.0, 7.0]]


# challenger (median, p80-p20), default (median, p80-p20), kept: the case each covers
CASES = [
    ((0.95, 0.01), (1.00, 0.01), "challenger"),  # 5% faster, tight spreads: a real lead
    ((0.995, 0.001), (1.00, 0.001), "default"),  # 0.5% faster: under the noise floor
    ((0.97, 0.08), (1.00, 0.01), "default"),  # 3% faster, but its own samples spread ±4%
    ((0.97, 0.01), (1.00, 0.08), "default"),  # 3% faster, but the default's samples spread ±4%
    ((0.95, 0.08), (1.00, 0.02), "challenger"),  # 5% faster beyond a ±4% spread
    ((1.02, 0.01), (1.00, 0.01), "default"),  # slower head to head, whatever the careful stage said
]


@pytest.mark.parametrize("challenger, default, kept", CASES)
def test_the_default_stays_unless_beaten_beyond_the_noise(challenger, default, kept):
    decision = decide(CHALLENGER, DEFAULT, Versus(timed(*challenger), timed(*default)))
    assert decision.kept == kept
    assert decision.margin_ms == pytest.approx(max(challenger[1] / 2, default[1] / 2, NOISE_FLOOR * default[0]))
    assert decision.winner == (CHALLENGER if kept == "challenger" else DEFAULT)


def test_a_failure_head_to_head_decides_against_the_one_that_failed():
    died = Outcome.failed("the worker died (exit code -11) on this candidate and was restarted")
    assert decide(CHALLENGER, DEFAULT, Versus(died, timed(1.0, 0.01))).kept == "default"
    assert decide(CHALLENGER, DEFAULT, Versus(timed(1.0, 0.01), died)).kept == "challenger"
    assert decide(CHALLENGER, DEFAULT, Versus.from_dict({"ok": False, "error": "hung"})).kept == "default"


class Evaluator:
    """Careful times from ``careful``, head-to-head times from ``versus``; every call recorded."""

    def __init__(self, careful: dict, versus: dict):
        self.careful, self.times, self.calls = careful, versus, []

    def measure(self, problem, tokens, cfg, stage):
        self.calls.append((stage, cfg))
        return SimpleNamespace(ok=True, error=None, median_ms=self.careful[cfg], spread_ms=0.002, rel_error=1e-4)

    def versus(self, problem, tokens, challenger, default, rounds):
        self.calls.append(("versus", (challenger, default, rounds)))
        return Versus(timed(self.times[challenger], 0.004), timed(self.times[default], 0.004))


def settle(evaluator: Evaluator, policy: SearchPolicy = INTERPRETER) -> BucketResult:
    screened = {c: evaluator.measure(PROBLEM, 32, c, "screen") for c in (CHALLENGER, DEFAULT)}
    return settle_bucket(PROBLEM, 32, [CHALLENGER, DEFAULT], screened, DEFAULT, evaluator, policy)


def test_a_settle_keeps_the_default_when_the_careful_winner_only_ties_it():
    # 3% ahead in the careful stage, 0.5% head to head: the default stays, and the result says why.
    evaluator = Evaluator(careful={CHALLENGER: 0.97, DEFAULT: 1.0}, versus={CHALLENGER: 0.995, DEFAULT: 1.0})
    result = settle(evaluator)
    assert ("versus", (CHALLENGER, DEFAULT, INTERPRETER.versus_rounds)) in evaluator.calls
    assert result.winner == DEFAULT and result.speedup == 1.0
    assert result.median_ms == result.default_ms == 1.0
    data = result.to_dict()
    assert data["versus"]["kept"] == "default" and data["versus"]["challenger_short"] == CHALLENGER.short()
    assert BucketResult.from_dict(PROBLEM, data).to_dict() == data  # the journal keeps the decision


def test_a_settle_takes_the_winner_that_beats_the_default_and_reports_the_head_to_head_times():
    evaluator = Evaluator(careful={CHALLENGER: 0.9, DEFAULT: 1.0}, versus={CHALLENGER: 0.8, DEFAULT: 1.1})
    result = settle(evaluator)
    assert result.winner == CHALLENGER and result.versus.kept == "challenger"
    assert (result.median_ms, result.default_ms) == (0.8, 1.1)


def test_no_head_to_head_when_the_default_wins_the_careful_stage():
    evaluator = Evaluator(careful={CHALLENGER: 1.1, DEFAULT: 1.0}, versus={})
    result = settle(evaluator)
    assert result.winner == DEFAULT and result.versus is None
    assert not [c for c in evaluator.calls if c[0] == "versus"]


class CarefulFlattersTimer(HashTimer):
    """Every config looks 3% faster in the careful stage than head to head, where it is within
    0.5% of the default: the careful stage alone would replace the default everywhere."""

    def __call__(self, problem, tokens, cfg, stage):
        outcome = super().__call__(problem, tokens, cfg, stage)
        default = default_config(problem, INTERPRETER_DEVICE)
        if cfg == default:
            return outcome
        base = super().__call__(problem, tokens, default, stage).median_ms
        median = base * (0.97 if stage != "versus" else 0.995)
        return Outcome(ok=True, median_ms=median, spread_ms=0.001, samples=1, rel_error=1e-3)


def test_the_sweep_never_keeps_a_config_that_did_not_beat_the_default(tmp_path, rng):
    options = SweepOptions(model=resolve_model("tiny"), tokens=(16, 32), interpret=True, cache_dir=tmp_path)
    report = run_sweep(options, timer=CarefulFlattersTimer(rng.getrandbits(31)))
    assert report.complete
    buckets = [b for results in report.results.values() for b in results]
    assert len(buckets) == 6 * 2
    for bucket in buckets:
        assert bucket.winner == bucket.default and bucket.speedup == 1.0
        assert bucket.versus is not None and bucket.versus.kept == "default"
    data = report.to_dict()
    assert all(b["versus"]["kept"] == "default" for p in data["problems"] for b in p["buckets"])
