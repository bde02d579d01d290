"""The lanes' scheduler (moe_tune/tuning/schedule.py) on its own: real threads, fake measurements.

A screen "measurement" sleeps a random few milliseconds and returns a fake outcome; a settle
records when it ran. The tests check the order the sweep relies on (each settle after its whole
screen and after the problem's previous settle), that each screen config is measured exactly
once, that lanes take compiled configs first, and that the first error stops every lane."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest

from moe_tune.problem import KernelConfig, MoeShape
from moe_tune.tuning.schedule import Bucket, Scheduler

PROBLEMS = MoeShape(E=8, H=64, I=32, topk=2).problems("float16")
TOKENS = (16, 32, 64)


@dataclass
class FakeOutcome:
    ok: bool = True
    median_ms: float = 1.0


def configs(count: int) -> list[KernelConfig]:
    return [KernelConfig(BLOCK_M=16 << (i % 4), BLOCK_N=32, BLOCK_K=32, num_stages=2 + i // 4) for i in range(count)]


def chains(problems, screen_size: int, **kw) -> list[Bucket]:
    made = []
    for problem in problems:
        chain = []
        for t in TOKENS:
            chain.append(Bucket(problem, t, configs(screen_size), previous=chain[-1] if chain else None, **kw))
        made.append(chain)
    return [chain[i] for i in range(len(TOKENS)) for chain in made]


class Log:
    def __init__(self, rng):
        self.rng = rng
        self.lock = threading.Lock()
        self.events: list[tuple] = []

    def measure(self, lane, problem, tokens, cfg):
        time.sleep(self.rng.random() * 0.003)
        with self.lock:
            self.events.append(("screen", lane, problem.key, tokens, cfg))
        return FakeOutcome(median_ms=1.0 + self.rng.random())

    def settle(self, lane, bucket):
        assert len(bucket.screened) == len(bucket.screen)  # the whole screen, wherever it ran
        assert bucket.previous is None or bucket.previous.settled
        time.sleep(self.rng.random() * 0.003)
        with self.lock:
            self.events.append(("settle", lane, bucket.problem.key, bucket.tokens))
        return f"result {bucket.problem.key} {bucket.tokens}"


@pytest.mark.parametrize("lanes", [1, 2, 5])  # one lane runs in the calling thread; 5 lanes > problems
def test_every_screen_once_and_settles_in_chain_order(rng, lanes):
    buckets = chains(PROBLEMS, screen_size=rng.randint(3, 7))
    log = Log(rng)
    settled = []
    Scheduler(buckets, measure=log.measure, settle=log.settle, compiled=lambda *a: True,
              on_settled=settled.append).run([f"lane{i}" for i in range(lanes)])
    screens = [e[2:] for e in log.events if e[0] == "screen"]
    assert sorted(map(str, screens)) == sorted(str((b.problem.key, b.tokens, c)) for b in buckets for c in b.screen)
    assert all(b.result == f"result {b.problem.key} {b.tokens}" for b in buckets) and len(settled) == len(buckets)
    where = {e[2:]: i for i, e in enumerate(log.events) if e[0] == "settle"}
    for b in buckets:
        last_screen = max(i for i, e in enumerate(log.events) if e[0] == "screen" and e[2:4] == (b.problem.key, b.tokens))
        assert last_screen < where[(b.problem.key, b.tokens)]
    if lanes > 1:
        assert len({e[1] for e in log.events}) > 1  # the work spread


def test_lanes_take_compiled_configs_first(rng):
    first, second = chains(PROBLEMS[:2], screen_size=4)[:2]  # two problems' smallest buckets
    buckets = [first, second]
    ready = {(second.problem.key, c) for c in second.screen}  # only the second bucket is compiled

    def compiled(problem, tokens, cfg):
        return (problem.key, cfg) in ready

    log = Log(rng)

    def measure(lane, problem, tokens, cfg):
        deadline = time.monotonic() + 5
        while not compiled(problem, tokens, cfg):  # like the engine: wait for the compile
            assert time.monotonic() < deadline, "a lane waited on an uncompiled config while compiled ones were left"
            time.sleep(0.001)
        outcome = log.measure(lane, problem, tokens, cfg)
        with log.lock:
            if sum(e[2] == second.problem.key for e in log.events) == 4:
                ready.update((first.problem.key, c) for c in first.screen)  # now the first compiles
        return outcome

    scheduler = Scheduler(buckets, measure=measure, settle=log.settle, compiled=compiled)
    scheduler.run(["a", "b"])
    screens = [e[2] for e in log.events if e[0] == "screen"]
    # The first bucket has priority, but nothing of it was compiled until the second's screen was
    # done: waiting on it first would never end (the test's compile waits for the second's screen).
    assert screens[:4] == [second.problem.key] * 4 and screens[4:] == [first.problem.key] * 4


def test_part_of_a_screen_and_no_settle():
    # A torchrun rank's phase 1: it screens its configs of each bucket and settles nothing.
    buckets = chains(PROBLEMS[:1], screen_size=6, settle_here=False, mine=configs(6)[::2])
    seen = []
    Scheduler(buckets, measure=lambda lane, p, t, c: seen.append((t, c)) or FakeOutcome(),
              settle=lambda lane, b: pytest.fail("settled"), compiled=lambda *a: True).run(["a", "b", "c"])
    assert sorted(map(str, seen)) == sorted(str((b.tokens, c)) for b in buckets for c in b.screen[::2])
    assert all(b.finished and not b.settled for b in buckets)


class Stop(Exception):
    pass


@pytest.mark.parametrize("also_stop", [False, True])
def test_first_error_stops_every_lane(rng, also_stop):
    buckets = chains(PROBLEMS, screen_size=5)
    log = Log(rng)
    count = [0]

    def measure(lane, problem, tokens, cfg):
        with log.lock:
            count[0] += 1
            mine = count[0]
        if also_stop and mine == 5:
            time.sleep(0.05)  # while this lane stops, another fails for real: the real error wins
            raise Stop("budget")
        if mine == 7:
            raise ValueError("worker could not start")
        return log.measure(lane, problem, tokens, cfg)

    with pytest.raises(ValueError, match="could not start"):
        Scheduler(buckets, measure=measure, settle=log.settle, compiled=lambda *a: True,
                  stops=(Stop,)).run(["a", "b", "c"])
    assert count[0] < 12  # no lane carried on with the ~90 measurements left
