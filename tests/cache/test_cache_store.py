"""The locked store with real files, real locks and real processes: merges under the lock,
32 concurrent writers that never fail for waiting behind each other, a writer SIGKILLed
mid-write, a stuck lock holder, damaged and future-version files, dry-run previews."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from moe_tune.cache import CacheFile, CacheStore, read_cache_file
from moe_tune.cache.software import Software
from moe_tune.cache.store import read_inputs
from moe_tune.cache.testing import H100, random_cache_file, random_config, random_measurement, random_problem
from moe_tune.errors import CacheError, CacheVersionError, CacheWarning

SOFTWARE = Software(triton="3.6.0", torch="2.11.0", cuda="13.0", moe_tune="0.1.0", kernel_hash="0123456789abcdef")

# Worker processes import only moe_tune.cache (no torch): ~0.1 s each, so 32 fit a 2-core box.
WRITER = textwrap.dedent("""
    import random, sys, time
    from pathlib import Path
    from moe_tune.cache import CacheFile, CacheStore
    from moe_tune.cache.software import Software
    from moe_tune.cache.testing import H100, random_config, random_measurement
    from moe_tune.problem import Problem

    directory, worker, seed, entries, writes, timeout, go = sys.argv[1:]
    worker, entries, writes = int(worker), int(entries), int(writes)
    software = Software("3.6.0", "2.11.0", "13.0", "0.1.0", "0123456789abcdef")
    rng = random.Random(int(seed))
    while not Path(go).exists():  # start together: maximise contention
        time.sleep(0.005)
    per_write = entries // writes
    for w in range(writes):
        cache = CacheFile.new(H100, software, command=f"worker {worker} write {w}")
        for i in range(w * per_write, (w + 1) * per_write):
            problem = Problem("forward", 128, 64 * (worker + 1), 64 * (i + 1), 8, "bfloat16", gather=True)
            cache.add(problem, 4096, random_config(rng), random_measurement(rng))
        CacheStore(directory, lock_timeout=float(timeout)).write(cache)
""")


def _expected_entries(seed: int, worker: int, entries: int):
    import random

    from moe_tune.problem import Problem

    rng = random.Random(seed)
    for i in range(entries):
        problem = Problem("forward", 128, 64 * (worker + 1), 64 * (i + 1), 8, "bfloat16", gather=True)
        yield problem, random_config(rng), random_measurement(rng)


def test_write_then_read_round_trip(tmp_path, rng):
    cache = random_cache_file(rng)
    result = CacheStore(tmp_path).write(cache)
    assert result.path == tmp_path / cache.name and result.stats.added == len(cache)
    assert read_cache_file(result.path) == cache
    assert CacheStore(tmp_path).read(cache.device, cache.triton) == cache
    assert oct(result.path.stat().st_mode & 0o777) == oct(0o644)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_second_write_merges_under_the_lock(tmp_path, rng):
    store = CacheStore(tmp_path)
    first = random_cache_file(rng, software=SOFTWARE)
    store.write(first)
    second = CacheFile.new(H100, SOFTWARE, command="second", sweep_seconds=3.0)
    problem = random_problem(rng)
    second.add(problem, 256, random_config(rng), random_measurement(rng))
    assert store.write(second).stats.added == 1
    on_disk = store.read(H100, "3.6.0")
    assert len(on_disk) == len(first) + 1
    assert [w.command for w in on_disk.provenance.writes] == ["moe-tune sweep --test", "second"]
    assert on_disk.provenance.created == first.provenance.created


def test_32_writers_of_50_entries_lose_nothing_and_never_time_out(tmp_path, rng):
    # Each writer takes the lock twice (the writer that just released it races the waiters), and
    # the lock timeout is far below the time 31 other writers hold the lock in turn: a waiter must
    # wait as long as writers ahead of it finish, and fail only when none does.
    workers, entries, writes, timeout = 32, 50, 2, 5.0
    go = tmp_path / "go"
    seeds = [rng.getrandbits(32) for _ in range(workers)]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "cache"), str(w), str(seeds[w]), str(entries),
                               str(writes), str(timeout), str(go)], env=env, stderr=subprocess.PIPE)
             for w in range(workers)]
    go.touch()
    target = tmp_path / "cache" / CacheFile.new(H100, SOFTWARE, command="x").name
    reads = 0
    # Read while they write: every read must see a whole file (the old one or the new one).
    while any(p.poll() is None for p in procs):
        if target.exists():
            read_cache_file(target)
            reads += 1
        time.sleep(0.05)
    failures = [p.stderr.read().decode() for p in procs if p.wait() != 0]
    assert failures == []
    final = read_cache_file(target)
    assert len(final) == workers * entries
    for w in range(workers):
        for problem, config, measurement in _expected_entries(seeds[w], w, entries):
            entry = final.get(problem, 4096)
            assert entry is not None and entry.config == config
            assert entry.measurement.median_ms == measurement.median_ms
    assert len(final.provenance.writes) == 32  # capped: the latest writes only
    assert reads > 0


KILLED_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from moe_tune.cache import CacheFile, CacheStore
    from moe_tune.cache.software import Software
    from moe_tune.cache.testing import H100, random_config, random_measurement
    from moe_tune.problem import Problem
    import random

    directory, marker = sys.argv[1], Path(sys.argv[2])
    rng = random.Random(0)
    cache = CacheFile.new(H100, Software("3.6.0", "2.11.0", "13.0", "0.1.0", "0123456789abcdef"), command="doomed")
    cache.add(Problem("dx", 8, 64, 64, 2, "float16", scatter=True), 128, random_config(rng), random_measurement(rng))

    class PausedBeforePublishing(CacheStore):
        # Holds the lock with the new content staged, complete and fsynced, until it is killed.
        def publish(self, staged, path):
            marker.write_text(str(staged))
            time.sleep(600)

    PausedBeforePublishing(directory).write(cache)
""")


def test_writer_killed_mid_write_leaves_the_old_file(tmp_path, rng):
    old = random_cache_file(rng, software=SOFTWARE)
    path = CacheStore(tmp_path).write(old).path
    before = path.read_bytes()
    marker = tmp_path / "paused"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path), str(marker)])
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, "the writer died before publishing"
            assert time.monotonic() < deadline, "the writer never reached publish"
            time.sleep(0.01)
        temp = Path(marker.read_text())
        assert temp.exists() and temp.parent == tmp_path
        assert path.read_bytes() == before  # the new content is complete on disk, not yet in place
        # The holder is stuck (no writer finishes): a waiter gives up after its timeout, with the reason.
        started = time.monotonic()
        with pytest.raises(CacheError, match="no writer finished.*stuck"):
            CacheStore(tmp_path, lock_timeout=0.3).write(random_cache_file(rng, software=SOFTWARE))
        assert time.monotonic() - started < 5
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert path.read_bytes() == before
    assert read_cache_file(path) == old
    # The OS dropped the dead writer's lock: the next writer proceeds and cleans up its temp file.
    late = random_cache_file(rng, software=SOFTWARE, problems=1, buckets=1)
    CacheStore(tmp_path, lock_timeout=5).write(late)
    assert not temp.exists()
    assert len(read_cache_file(path)) == len(old) + len(late)


def test_corrupt_existing_file_is_moved_aside(tmp_path, rng):
    cache = random_cache_file(rng, software=SOFTWARE)
    path = tmp_path / cache.name
    path.write_text('{"schema_version": "1.0", "kind": "moe-tu')
    with pytest.warns(CacheWarning, match="moved it to"):
        CacheStore(tmp_path).write(cache)
    assert read_cache_file(path) == cache
    aside = [p for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    assert len(aside) == 1 and aside[0].read_text().endswith("moe-tu")


def test_newer_version_file_is_never_overwritten(tmp_path, rng):
    cache = random_cache_file(rng, software=SOFTWARE)
    path = tmp_path / cache.name
    doc = cache.to_json()
    doc["schema_version"] = "9.0"
    path.write_text(json.dumps(doc))
    before = path.read_bytes()
    with pytest.raises(CacheVersionError):
        CacheStore(tmp_path).write(random_cache_file(rng, software=SOFTWARE))
    assert path.read_bytes() == before


def test_read_inputs_takes_files_packs_and_directories(tmp_path, rng):
    from moe_tune.cache import Pack

    a, b = random_cache_file(rng), random_cache_file(rng, device=H100.__class__("NVIDIA H200", (9, 0), 132, 232448))
    CacheStore(tmp_path / "dir").write(a)
    CacheStore(tmp_path / "dir").write(b)
    (tmp_path / "pack.json").write_text(Pack([a, b]).dumps())
    assert sorted(c.name for _, c in read_inputs(tmp_path / "dir")) == sorted([a.name, b.name])
    assert [c for _, c in read_inputs(tmp_path / "dir" / a.name)] == [a]
    origins = [o for o, _ in read_inputs(tmp_path / "pack.json")]
    assert all(o.startswith(str(tmp_path / "pack.json") + "[") for o in origins)
    with pytest.raises(CacheError, match="no such file"):
        read_inputs(tmp_path / "missing.json")
