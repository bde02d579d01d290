"""Worker processes (moe_tune/tuning/workers.py), for real: spawned interpreters running
candidates under Triton's interpreter, with faults injected by config (``tuning_faults``: a
``Bench`` subclass the workers build). A crash or a hang costs the candidate, is reported as such,
and the next request gets a fresh worker."""

from __future__ import annotations

import time

from moe_tune.device import INTERPRETER_DEVICE
from moe_tune.models import load_preset
from moe_tune.space import candidates
from moe_tune.tuning.workers import WorkerPool, WorkerProcess
from tuning_faults import faulty

PROBLEM = load_preset("tiny").problems("float32")[0]
CONFIGS = candidates(PROBLEM, INTERPRETER_DEVICE, "interpret", num_tokens=32)


def measure(cfg, stage="screen"):
    return {"op": "measure", "problem": PROBLEM.to_dict(), "tokens": 32, "seed": 1, "stage": stage,
            "routing": {"kind": "uniform", "skew": 0.0, "path": None}, "config": cfg.to_dict()}


def test_crash_hang_and_error_each_cost_one_candidate(rng):
    crasher, hanger, raiser, good = rng.sample(CONFIGS, 4)
    worker = WorkerProcess(bench=faulty({crasher.short(): "crash", hanger.short(): "hang", raiser.short(): "raise"}),
                           start_timeout=120)
    try:
        assert worker.call(measure(good), timeout=60)["ok"]
        first_pid = worker.pid

        reply = worker.call(measure(crasher), timeout=60)
        assert reply == {"ok": False, "failure": "crashed",
                         "error": "the worker died (exit code 70) on this candidate and was restarted"}
        assert worker.call(measure(good), timeout=60)["ok"]
        assert worker.pid != first_pid and worker.restarts == 1

        start = time.monotonic()
        reply = worker.call(measure(hanger), timeout=3)
        assert reply["failure"] == "timeout" and not reply["ok"]
        assert time.monotonic() - start < 30
        reply = worker.call(measure(good), timeout=60)
        assert reply["ok"], reply
        assert worker.restarts == 2

        reply = worker.call(measure(raiser), timeout=60)
        assert not reply["ok"] and "injected fault" in reply["error"] and "failure" not in reply
        assert worker.restarts == 2  # an ordinary failure keeps the worker
    finally:
        worker.close()
    assert not worker.alive()


def test_pool_compiles_in_parallel_and_survives_a_crashing_compile(rng):
    crasher = rng.choice(CONFIGS[6:])
    with WorkerPool(2, bench=faulty({crasher.short(): "crash"}), start_timeout=120) as pool:
        futures = {cfg: pool.submit({"op": "compile", "problem": PROBLEM.to_dict(), "config": cfg.to_dict(),
                                     "tokens": [32, 64]}, timeout=60) for cfg in CONFIGS[:6] + [crasher]}
        replies = {cfg: f.result(timeout=120) for cfg, f in futures.items()}
    assert replies[crasher]["failure"] == "crashed"
    assert all(r["ok"] for cfg, r in replies.items() if cfg != crasher)
