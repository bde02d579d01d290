"""benchmarks/cost_model_check.py: the cost model scored against a sweep journal's screen times."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from moe_tune.device import DeviceInfo
from moe_tune.models import load_preset
from moe_tune.space import candidates
from moe_tune.tuning.search import estimate_ms

H200 = DeviceInfo("NVIDIA H200", (9, 0), sm_count=132, max_shared_mem=232448)
_TOOL = Path(__file__).resolve().parents[2] / "benchmarks" / "cost_model_check.py"


def _tool():
    spec = importlib.util.spec_from_file_location("cost_model_check", _TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _journal(path: Path, problem, tokens: int, timed) -> Path:
    records = [{"type": "header", "version": 1, "settings": {"device": H200.to_dict()}}]
    for cfg, ms in timed:
        records.append({"type": "measure", "problem": problem.key, "tokens": tokens, "stage": "screen",
                        "config_short": cfg.short(), "config": cfg.to_dict(),
                        "outcome": {"ok": True, "median_ms": ms}})
        records.append({"type": "measure", "problem": problem.key, "tokens": tokens, "stage": "careful",
                        "config_short": cfg.short(), "config": cfg.to_dict(),
                        "outcome": {"ok": True, "median_ms": 1e-9}})  # only screen times count
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


@pytest.mark.parametrize("order", ["model", "reversed"])
def test_scores_a_journal_against_the_model(tmp_path, rng, order):
    tool = _tool()
    problem = rng.choice(load_preset("qwen3-30b-a3b").problems())
    tokens = rng.choice([1024, 4096, 16384])
    by_estimate = {}  # one config per estimate: tied estimates would make the expected ranks ambiguous
    for cfg in candidates(problem, H200, "default", num_tokens=tokens):
        by_estimate.setdefault(estimate_ms(problem, cfg, tokens, H200), cfg)
    chosen = rng.sample(sorted(by_estimate), 20)
    ranked = [by_estimate[e] for e in sorted(chosen)]
    # Times are made up, in the model's order or against it (fresh values each run).
    times = sorted(rng.uniform(0.1, 5.0) for _ in ranked)
    if order == "reversed":
        times.reverse()
    journal = _journal(tmp_path / "sweep.jsonl", problem, tokens, zip(ranked, times))
    (row,) = tool.check([journal])
    assert row["problem"] == problem.key and row["tokens"] == tokens and row["configs"] == 20
    if order == "model":
        assert row["spearman"] == pytest.approx(1.0) and row["top5_regret"] == pytest.approx(1.0)
    else:
        assert row["spearman"] == pytest.approx(-1.0)
        assert row["top5_regret"] == pytest.approx(times[4] / times[-1], rel=1e-3)


def test_a_journal_without_header_is_refused(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"type": "measure"}) + "\n")
    with pytest.raises(SystemExit, match="no journal header"):
        _tool().check([path])
