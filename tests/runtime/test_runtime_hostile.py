"""The runtime loader on hostile cache files (issue #15): each defect class gives one warning and
the next layer's config (or the default), never an exception and never a block; strict mode
raises the typed ``CacheError``. Files written by the real store, then damaged on disk; a real FIFO
and a sparse file; a fresh process for the FIFO, so a block would show as a timeout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from moe_tune import runtime
from moe_tune.cache import fields
from moe_tune.cache.testing import H100
from moe_tune.errors import CacheError

from test_runtime_resolution import UP_FWD, caught, config, write


def _bucket(doc: dict) -> dict:
    return next(iter(doc["entries"].values()))["buckets"][0]


def _set(path: tuple, value):
    def damage(doc: dict) -> str:
        target = doc
        for key in path[:-1]:
            target = target[key] if key != "bucket" else _bucket(doc)
        target[path[-1]] = "__VALUE__"
        return json.dumps(doc).replace('"__VALUE__"', value)

    return damage


# name → the damaged text, from the good file's document; each a defect class of the issue
HOSTILE = {
    "overflowing sm_count": _set(("device", "sm_count"), "1e999"),
    "overflowing capability": _set(("device", "capability"), "[9e999, 0]"),
    "deep nesting": lambda doc: "[" * 100_000,
    "naive timestamp": _set(("bucket", "measurement", "measured_at"), '"2026-11-27T13:00:00"'),
    "date-only timestamp": _set(("provenance", "created"), '"2026-11-27"'),
    "huge num_warps": _set(("bucket", "config", "num_warps"), "1048576"),
    "huge num_stages": _set(("bucket", "config", "num_stages"), "1048576"),
    "huge BLOCK_M": _set(("bucket", "config", "BLOCK_M"), str(2**40)),
    "huge GROUP_M": _set(("bucket", "config", "GROUP_M"), str(2**40)),
    "negative tokens": _set(("bucket", "tokens"), "-1"),
    "NaN median": _set(("bucket", "measurement", "median_ms"), "NaN"),
    "escape sequence in the device name": _set(("device", "name"), json.dumps("NVIDIA H100 80GB HBM3\x1b[2J")),
    "random bytes": lambda doc: os.urandom(4096),
}


@pytest.mark.parametrize("hostile", sorted(HOSTILE))
def test_hostile_file_warns_once_and_falls_through(layers, rng, monkeypatch, hostile):
    monkeypatch.setenv("MOE_TUNE_CACHE_DIR", str(layers.env))
    good = config(rng)
    write(layers.user, {UP_FWD: {4096: good}})
    bad = write(layers.env, {UP_FWD: {4096: config(rng)}})
    text = HOSTILE[hostile](json.loads(bad.read_text()))
    bad.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    resolution, seen = caught(lambda: runtime.explain(UP_FWD, 4096, H100))
    assert resolution.source == "user" and resolution.config == good
    assert len(seen) == 1 and bad.name in str(seen[0].message) and "\n" not in str(seen[0].message)
    runtime.reset()
    monkeypatch.setenv("MOE_TUNE_STRICT", "1")
    with pytest.raises(CacheError, match=bad.name):
        runtime.get_config(UP_FWD, 4096, H100)


def test_hostile_file_alone_gives_the_default(layers, rng):
    bad = write(layers.user, {UP_FWD: {4096: config(rng)}})
    bad.write_text("[" * 100_000)
    resolution, seen = caught(lambda: runtime.explain(UP_FWD, 4096, H100))
    assert resolution.source == "default"
    assert len(seen) == 2  # the skipped file, then the miss naming the sweep command


def test_oversized_file_is_skipped_unread(layers, rng):
    bad = write(layers.user, {UP_FWD: {4096: config(rng)}})
    with open(bad, "r+b") as handle:
        handle.truncate(fields.MAX_FILE_BYTES + 1)
    resolution, seen = caught(lambda: runtime.explain(UP_FWD, 4096, H100))
    assert resolution.source == "default" and any("larger than" in str(w.message) for w in seen)


# A fresh process: a loader that opened the FIFO would block there, and the timeout would show it.
# The problem is in no shipped cache, so the answer is the default (strict mode: a miss).
FIFO_READER = textwrap.dedent("""
    import sys, warnings
    from moe_tune import runtime
    from moe_tune.cache.testing import H100
    from moe_tune.problem import MoeShape

    runtime.set_cache_dir(sys.argv[1])
    problem = MoeShape(E=4, H=64, I=32, topk=2).problems()[0]
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        print(runtime.explain(problem, 4096, H100).source)
""")


@pytest.mark.parametrize("strict", ["0", "1"])
@pytest.mark.parametrize("root", ["the directory holding it", "the FIFO itself"])
def test_fifo_named_like_a_cache_file_never_blocks(tmp_path, strict, root):
    fifo = tmp_path / "cache" / "nvidia-h100-80gb-hbm3__triton-3.6.0.json"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    env = {**os.environ, "MOE_TUNE_STRICT": strict, "MOE_TUNE_CACHE_DIR": "", "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    target = fifo.parent if root == "the directory holding it" else fifo
    done = subprocess.run([sys.executable, "-c", FIFO_READER, str(target)], env=env, capture_output=True, text=True,
                          timeout=60)
    if strict == "0":
        assert done.returncode == 0 and done.stdout.split() == ["default"], done.stderr
    else:  # not a cache file: skipped like an absent one, so strict mode reports a miss
        assert done.returncode == 1 and "CacheMissError" in done.stderr
