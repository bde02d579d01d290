"""Sweeps over several lanes, torchrun ranks and shards (moe_tune/tuning/distribute.py and the
sweep engine's split), with the deterministic ``HashTimer`` standing in for the GPU: a split
sweep must pick exactly the winners of a one-lane sweep. Ranks are real processes on the gloo
backend (torch.multiprocessing spawn, 127.0.0.1, a free port); one of them is killed mid-sweep
and ``--resume`` finishes only what it had not journalled."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from moe_tune.cache import CacheStore
from moe_tune.device import INTERPRETER_DEVICE
from moe_tune.errors import InvalidInputError
from moe_tune.models import resolve_model
from moe_tune.tuning.distribute import Launch, assign, chain_bound, parse_gpus, parse_shard, physical_gpu, screen_slices
from moe_tune.tuning.journal import read_records
from moe_tune.tuning.options import SweepOptions
from moe_tune.tuning.sweep import run_sweep
from moe_tune.tuning.testing import HashTimer

TINY = resolve_model("tiny")
TOKENS = (16, 32)


def options(cache_dir, **extra) -> SweepOptions:
    return SweepOptions(model=TINY, tokens=TOKENS, interpret=True, cache_dir=cache_dir, **extra)


def winners(cache_dir: Path) -> dict:
    from moe_tune.cache.software import triton_version

    cache = CacheStore(cache_dir).read(INTERPRETER_DEVICE, triton_version())
    return {(p.key, t): e.config for p, buckets in cache.entries.items() for t, e in buckets.items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the split itself ---------------------------------------------------------------------------


def test_assign_is_longest_first_and_deterministic():
    costs = {"a": 5.0, "b": 4.0, "c": 3.0, "d": 3.0, "e": 1.0}
    assert assign(costs, 2) == [["a", "d"], ["b", "c", "e"]]  # c before d (ties by key), each to the lighter bin
    assert assign(dict(reversed(costs.items())), 2) == assign(costs, 2)  # independent of input order
    assert sorted(u for b in assign(costs, 3) for u in b) == sorted(costs)

def test_chain_bound_and_screen_slices():
    # (all of a problem's work, its settle chain): the sweep lasts at least its longest chain.
    costs = {"a": (10.0, 2.0), "b": (10.0, 8.0)}
    assert chain_bound(costs, 1) == 1.0 and chain_bound(costs, 2) == 1.0  # 10 of work per lane ≥ the chain of 8
    assert chain_bound(costs, 4) == pytest.approx(20 / (4 * 8))  # four lanes, five units of work per lane < 8
    assert screen_slices(list(range(19)), 8) == [list(range(8)), list(range(8, 16)), [16, 17, 18]]


@pytest.mark.parametrize("text, available, expected", [
    ("0,2", 4, (0, 2)),
    ("1", 2, (1,)),  # one GPU, not the first
    ("all", 3, (0, 1, 2)),
    (" 3 1 ", 4, (3, 1)),  # spaces as separators, order kept
])
def test_parse_gpus(text, available, expected):
    assert parse_gpus(text, available) == expected


@pytest.mark.parametrize("text, available, message", [
    ("2", 2, "--gpus 2: no such GPU (GPUs 0..1 are visible)"),
    ("0", 0, "--gpus 0: no such GPU (no GPU is visible)"),
    ("0,x", 2, "cannot read 'x'"),
    ("1,1", 2, "lists GPU 1 twice"),
    ("-1", 2, "no such GPU"),
    (",", 2, "at least one"),
])
def test_parse_gpus_errors(text, available, message):
    with pytest.raises(InvalidInputError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        parse_gpus(text, available)


def test_parse_shard_launch_and_physical_gpu():
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "1", "a/b", "0/0", "-1/2"):
        with pytest.raises(InvalidInputError, match="i/n"):
            parse_shard(bad)
    assert Launch.from_env({}) is None and Launch.from_env({"RANK": "0", "WORLD_SIZE": "1"}) is None
    assert Launch.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}) == \
        Launch(3, 4, 1, 2)
    with pytest.raises(InvalidInputError, match="inconsistent"):
        Launch.from_env({"RANK": "4", "WORLD_SIZE": "4"})
    assert physical_gpu(1, {"CUDA_VISIBLE_DEVICES": "4,6"}) == "6" and physical_gpu(1, {}) == "1"


# -- lanes in one process -------------------------------------------------------------------------


def test_lanes_pick_the_winners_of_one_lane(tmp_path, rng):
    salt = rng.getrandbits(31)
    one = run_sweep(options(tmp_path / "one"), timer=HashTimer(salt))
    # Each measurement takes real time, so that every lane gets work.
    three = run_sweep(options(tmp_path / "three", gpus=(0, 1, 2)), timer=HashTimer(salt, 0.003))
    assert one.complete and three.complete
    assert winners(tmp_path / "three") == winners(tmp_path / "one") and len(winners(tmp_path / "one")) == 6 * 2
    # Same measurements, each made once.
    assert three.stats.measurements == one.stats.measurements
    records = list(read_records(three.journal_path))
    keys = [(r["problem"], r["tokens"], r["stage"], r["config_short"]) for r in records
            if r["type"] in ("measure", "versus")]
    assert len(keys) == len(set(keys))
    # Every (problem, bucket) settled on one lane after its whole screen, and after the problem's
    # previous bucket (whose winner it re-times as a seed).
    units = three.to_dict()["units"]
    lanes = {"lane0:cpu", "lane1:cpu", "lane2:cpu"}
    assert len(units) == 12 and {u["settled_on"] for u in units} <= lanes
    assert {lane for u in units for lane in u["screened_on"]} == lanes  # every lane screened
    position = {}
    for i, r in enumerate(records):
        if r["type"] == "measure" and r["stage"] == "screen":
            position.setdefault(("screen", r["problem"], r["tokens"]), []).append(i)
        elif r["type"] == "bucket":
            position[("bucket", r["problem"], r["tokens"])] = i
    for (kind, problem, tokens), where in position.items():
        if kind == "bucket":
            assert max(position[("screen", problem, tokens)]) < where
            if tokens == TOKENS[1]:
                assert position[("bucket", problem, TOKENS[0])] < where
    assert three.to_dict()["lanes"] == ["cpu"] * 3 and 0 < three.balance_bound <= 1


def test_shards_then_merge_equal_the_unsharded_sweep(tmp_path, rng, cli_main):
    salt = rng.getrandbits(31)
    run_sweep(options(tmp_path / "all"), timer=HashTimer(salt))
    shards = [run_sweep(options(tmp_path / f"s{i}", shard=(i, 2)), timer=HashTimer(salt)) for i in range(2)]
    assert all(s.complete for s in shards)
    mine = [set(p.key for p in s.results) for s in shards]
    assert mine[0] and mine[1] and not mine[0] & mine[1]
    assert Path(shards[1].journal_path).name.endswith("-shard1of2.jsonl")
    code = cli_main("merge", tmp_path / "s0", tmp_path / "s1", "-o", tmp_path / "merged" / "m.json")
    assert code == 0
    merged = json.loads((tmp_path / "merged" / "m.json").read_text())
    got = {(k, b["tokens"]): b["config"] for k, e in merged["entries"].items() for b in e["buckets"]}
    assert got == {k: c.to_dict() for k, c in winners(tmp_path / "all").items()}


@pytest.fixture
def cli_main():
    from moe_tune.cli.app import main

    def run(*args) -> int:
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            return exc.code or 0
        return 0

    return run


# -- torchrun ranks on gloo -----------------------------------------------------------------------


def _rank(rank: int, world: int, port: int, cache_dir: str, salt: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TRITON_INTERPRET="1")
    report = run_sweep(options(cache_dir, gather_timeout_s=60), timer=HashTimer(salt))
    Path(out, f"rank{rank}.json").write_text(json.dumps(report.to_dict()))


def test_torchrun_ranks_split_and_gather_to_rank_0(tmp_path, rng):
    salt = rng.getrandbits(31)
    run_sweep(options(tmp_path / "single"), timer=HashTimer(salt))
    mp.spawn(_rank, args=(3, free_port(), str(tmp_path / "ranks"), salt, str(tmp_path)), nprocs=3)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    ran = [{p["problem"] for p in r["problems"]} for r in reports[1:]]
    assert all(ran) and not ran[0] & ran[1]  # every rank worked, on its own units
    assert reports[0]["complete"] and len(reports[0]["problems"]) == 6
    assert reports[0]["stats"]["measurements"] == sum(r["stats"]["measurements"] for r in reports[1:]) + \
        sum(1 for _ in read_records(reports[0]["journal_path"]) if _["type"] in ("measure", "versus"))
    assert reports[1]["cache_path"] is None  # only rank 0 writes
    assert winners(tmp_path / "ranks") == winners(tmp_path / "single")
    journals = sorted(p.name for p in (tmp_path / "ranks" / "journals").iterdir())
    assert journals == [f"sweep-tiny-float32-triton-interpreter-rank{r}of3.jsonl" for r in range(3)]


RANK_SCRIPT = """
import json, os, sys
from pathlib import Path
from moe_tune.models import resolve_model
from moe_tune.tuning.options import SweepOptions
from moe_tune.tuning.sweep import run_sweep
from moe_tune.tuning.testing import HashTimer
cache_dir, salt, delay, resume, out = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "1", sys.argv[5]
report = run_sweep(SweepOptions(model=resolve_model("tiny"), tokens=(16, 32), interpret=True, cache_dir=cache_dir,
                                resume=resume, gather_timeout_s=60), timer=HashTimer(salt, delay))
Path(out).write_text(json.dumps(report.to_dict()))
"""


def _launch(world: int, port: int, cache_dir: Path, salt: int, delays, resume: bool, out: Path):
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "TRITON_INTERPRET": "1"}
        procs.append(subprocess.Popen(
            [sys.executable, "-c", RANK_SCRIPT, str(cache_dir), str(salt), str(delays[rank]), "1" if resume else "0",
             str(out / f"rank{rank}.json")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    return procs


def _measures(journal: Path) -> list[dict]:
    """Every measurement journalled: single configs and heads to head."""
    return [r for r in read_records(journal) if r["type"] in ("measure", "versus")] if journal.exists() else []


# Rank 1 is killed in phase 1 (a few screens journalled: rank 0 stops at the exchange, with nothing
# settled) or in phase 2 (its first careful measurement journalled: rank 0 settles its own chains,
# writes them and reports rank 1 missing at the final gather).
@pytest.mark.parametrize("kill_in", ["screens", "settles"])
def test_killed_rank_then_resume_finishes_only_what_is_missing(tmp_path, rng, kill_in):
    salt = rng.getrandbits(31)
    run_sweep(options(tmp_path / "single"), timer=HashTimer(salt))
    cache = tmp_path / "ranks"
    journals = [cache / "journals" / f"sweep-tiny-float32-triton-interpreter-rank{r}of2.jsonl" for r in range(2)]
    first = tmp_path / "first"
    first.mkdir()

    def killable() -> bool:
        records = _measures(journals[1])
        if kill_in == "screens":
            return len(records) >= 4
        return any(r["stage"] == "careful" for r in records)

    procs = _launch(2, free_port(), cache, salt, (0.0, 0.2), False, first)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and procs[1].poll() is None and not killable():
            time.sleep(0.02)
        assert procs[1].poll() is None, procs[1].stderr.read().decode()
        procs[1].send_signal(signal.SIGKILL)
        assert procs[0].wait(90) == 0, procs[0].stderr.read().decode()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)
    rank0 = json.loads((first / "rank0.json").read_text())
    assert not rank0["complete"]
    if kill_in == "screens":
        assert "before the ranks exchanged their screens" in rank0["stopped"] and rank0["cache_path"] is None
    else:
        assert "rank(s) 1 did not report" in rank0["stopped"]
        assert rank0["cache_path"] is not None  # rank 0 wrote the chains it settled
    before = [_measures(j) for j in journals]

    second = tmp_path / "second"
    second.mkdir()
    procs = _launch(2, free_port(), cache, salt, (0.0, 0.0), True, second)
    for proc in procs:
        assert proc.wait(90) == 0, proc.stderr.read().decode()
    resumed = [json.loads((second / f"rank{r}.json").read_text()) for r in range(2)]
    assert resumed[0]["complete"] and resumed[0]["stopped"] is None
    # What either rank journalled before the kill is kept and answered from the journals: no
    # measurement is made twice, and the resumed ranks measured only the rest.
    after = [_measures(j) for j in journals]
    assert all(a[: len(b)] == b for a, b in zip(after, before))
    keys = [(r["problem"], r["tokens"], r["stage"], r["config_short"]) for records in after for r in records]
    assert len(keys) == len(set(keys))
    assert resumed[0]["stats"]["replayed_from_journal"] >= len(before[1])  # rank 0's stats include rank 1's
    assert resumed[0]["stats"]["measurements"] == sum(len(a) - len(b) for a, b in zip(after, before))
    assert winners(cache) == winners(tmp_path / "single")
