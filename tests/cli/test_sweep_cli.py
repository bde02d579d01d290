"""``moe-tune sweep / verify / doctor`` through the real entry point, under Triton's CPU
interpreter: the whole pipeline (candidates, gate, worker processes, journal, cache write) runs
on the tiny preset; a real ``moe-tune sweep`` process killed mid-sweep resumes with only what was
missing; no GPU means exit 2 with one clear line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from moe_tune import runtime
from moe_tune.cache import CacheFile, CacheStore, read_cache_file
from moe_tune.cache.testing import random_cache_file
from moe_tune.device import INTERPRETER_DEVICE
from moe_tune.models import load_preset
from moe_tune.space import HARD_PREDICATES, why_illegal
from moe_tune.tuning.journal import read_records

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")


def interpreter_cache(directory: Path) -> CacheFile:
    (path,) = [p for p in directory.iterdir() if p.name.startswith("triton-interpreter__") and p.suffix == ".json"]
    return read_cache_file(path)


def measure_keys(journal: Path) -> list[tuple]:
    """Every measurement journalled (single configs and heads to head), by what identifies it."""
    return [(r["problem"], r["tokens"], r["stage"], r["config_short"])
            for r in read_records(journal) if r["type"] in ("measure", "versus")]


def test_sweep_interpret_end_to_end(cli, tmp_path, rng):
    out = tmp_path / "cache"
    seed = rng.getrandbits(16)
    result = cli("sweep", "--interpret", "--tokens", "32", "--seed", seed, "-o", out, "--json")
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["complete"] and report["model"] == "tiny" and report["dtype"] == "float32"
    assert report["device"]["name"] == "triton-interpreter"

    cache = interpreter_cache(out)
    problems = load_preset("tiny").problems("float32")
    assert sorted(p.key for p in cache.problems()) == sorted(p.key for p in problems)
    reported = {p["problem"]: p["buckets"][0] for p in report["problems"]}
    for problem in problems:
        entry = cache.get(problem, 32)
        assert entry.measurement.correct and entry.measurement.max_rel_err <= 5e-3
        assert why_illegal(problem, entry.config, INTERPRETER_DEVICE, HARD_PREDICATES) is None
        assert entry.config.to_dict() == reported[problem.key]["winner"]
    assert cache.provenance.writes[-1].command.startswith("moe-tune sweep --model tiny --tokens 32 ")

    # What training sees: the runtime loader resolves every problem from this file.
    runtime.set_cache_dir(out)
    try:
        for problem in problems:
            assert runtime.get_config(problem, 40, device=INTERPRETER_DEVICE) == cache.get(problem, 32).config
    finally:
        runtime.set_cache_dir(None)

    # A second run with --resume finds every bucket done: nothing is measured again.
    again = cli("sweep", "--interpret", "--tokens", "32", "--seed", seed, "-o", out, "--resume", "--json")
    assert again.code == 0, again.stderr
    stats = json.loads(again.stdout)["stats"]
    assert stats["measurements"] == 0 and stats["compiles"] == 0
    # Resuming with other settings is refused, naming what differs.
    other = cli("sweep", "--interpret", "--tokens", "64", "--seed", seed, "-o", out, "--resume")
    assert other.code == 2 and "tokens" in other.stderr and "without --resume" in other.stderr


def test_killed_sweep_resumes_with_only_what_is_missing(cli, tmp_path):
    out = tmp_path / "cache"
    journal = out / "journals" / "sweep-tiny-float32-triton-interpreter.jsonl"
    args = ["sweep", "--interpret", "--gemms", "up", "--tokens", "32,64", "-o", str(out)]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "moe_tune", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        # Kill once a few candidates are journalled, well before the first problem is done.
        while time.monotonic() < deadline and proc.poll() is None:
            if journal.exists() and len(measure_keys(journal)) >= 5:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the sweep finished before it could be killed: " + proc.stderr.read().decode()
        os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its worker, like an OOM kill of the job
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    before = measure_keys(journal)
    assert 5 <= len(before) and not any(r["type"] == "bucket" and r["problem"].startswith("dw")
                                        for r in read_records(journal))

    result = cli(*args, "--resume", "--json")
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    after = measure_keys(journal)
    # The journal grew by appending: what was measured before the kill was replayed, not redone.
    assert after[: len(before)] == before
    assert not [key for key, n in Counter(after).items() if n > 1]
    assert report["stats"]["replayed_from_journal"] == len(before)
    assert report["stats"]["measurements"] == len(after) - len(before)
    assert report["complete"]
    cache = interpreter_cache(out)
    assert len(cache) == 3 * 2  # up forward/dx/dw × two buckets


def test_verify_retimes_cached_entries_and_flags_stale_ones(cli, tmp_path):
    out = tmp_path / "cache"
    assert cli("sweep", "--interpret", "--passes", "forward", "--tokens", "32", "-o", out).code == 0
    fine = cli("verify", "--interpret", "--cache-dir", out, "--tolerance", "1000", "--default-margin", "1000",
               "--json")
    assert fine.code == 0, fine.stderr
    data = json.loads(fine.stdout)
    assert data["entries_found"] == 2 and data["sampled"] == 2 and data["stale"] == 0
    assert all(v["now_ms"] > 0 and v["default_ms"] > 0 for v in data["verdicts"])

    # An entry recorded impossibly fast is now "slower than recorded": stale, exit 1.
    cache = interpreter_cache(out)
    problem = cache.problems()[0]
    bucket = cache.entries[problem][32]
    import dataclasses

    cache.entries[problem][32] = dataclasses.replace(
        bucket, measurement=dataclasses.replace(bucket.measurement, median_ms=1e-6))
    path = next(p for p in out.iterdir() if p.name == cache.name)
    path.write_text(cache.dumps())
    stale = cli("verify", "--interpret", "--cache-dir", out, "--json", "--sample", "5")
    assert stale.code == 1
    verdicts = {v["problem"]: v for v in json.loads(stale.stdout)["verdicts"]}
    assert verdicts[problem.key]["status"] == "slower-than-recorded" and verdicts[problem.key]["stale"]
    assert "stale" in stale.stderr


@NO_GPU
@pytest.mark.parametrize("command", [["sweep", "--model", "qwen3-30b-a3b"], ["verify"]])
def test_no_gpu_exits_2(cli, command):
    result = cli(*command)
    assert result.code == 2 and result.stdout == ""
    assert result.stderr.startswith("moe-tune: error: no CUDA GPU is visible") and \
        len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_doctor_reports_versions_gpu_and_cache_contents(cli, tmp_path, rng):
    cache = random_cache_file(rng, problems=2, buckets=3)
    CacheStore(tmp_path / "c").write(cache)
    (tmp_path / "c" / "junk__triton-3.6.0.json").write_text("{not json")
    graphs_budget = str(rng.randint(1, 9999))
    result = cli("doctor", "--cache-dir", tmp_path / "c", "--json",
                 env={"MOE_TUNE_CUDA_GRAPHS": "1", "MOE_TUNE_CUDA_GRAPHS_MIB": graphs_budget})
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["environment"]["MOE_TUNE_CUDA_GRAPHS"] == "1"
    assert report["environment"]["MOE_TUNE_CUDA_GRAPHS_MIB"] == graphs_budget
    assert report["versions"]["torch"] == torch.__version__ and report["versions"]["triton"]
    assert report["gpu"]["available"] == torch.cuda.is_available()
    explicit = next(layer for layer in report["caches"] if layer["layer"] == "explicit")
    files = {f["name"]: f for f in explicit["files"]}
    assert files[cache.name]["entries"] == len(cache) and files[cache.name]["device"] == cache.device.name
    assert "error" in files["junk__triton-3.6.0.json"]
    text = cli("doctor", "--cache-dir", tmp_path / "c")
    assert text.code == 0 and cache.name in text.stdout and "unreadable" in text.stdout


def test_sweep_lora_rank_through_the_cli(cli, tmp_path, rng):
    """``--lora-rank R --lora-only``: the LoRA GEMMs alone, labelled by matrix and rank in the
    summary, their keys in the cache, the flags in its provenance; bad ranks are one line, exit 2."""
    rank = rng.choice((2, 5))
    out = tmp_path / "cache"
    result = cli("sweep", "--interpret", "--tokens", "32", "--lora-rank", rank, "--lora-only", "--passes", "forward",
                 "-o", out)
    assert result.code == 0, result.stderr
    for label in ("up_a", "up_b", "down_a", "down_b"):
        assert f"{label}[r{rank}]" in result.stdout
    shape = load_preset("tiny").lora_problems(rank, "float32")
    wanted = {p.key for name, p in shape.items() if name.endswith(".forward") and "_" in name.split(".")[0]}
    cache = interpreter_cache(out)
    assert {p.key for p in cache.problems()} == wanted  # --lora-only: no base problem
    assert f"--lora-rank {rank} --lora-only" in cache.provenance.writes[-1].command
    for bad in ("0", "x", "16,-1"):
        refused = cli("sweep", "--interpret", "--lora-rank", bad, "-o", out)
        assert refused.code == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert "--lora-rank" in refused.stderr
    alone = cli("sweep", "--interpret", "--lora-only", "-o", out)
    assert alone.code == 2 and "--lora-only needs --lora-rank" in alone.stderr
