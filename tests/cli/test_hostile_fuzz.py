"""Fuzz (issue #15): a valid cache file or pack, mutated at random — truncated, bytes flipped or
inserted, values swapped for other types or for extreme numbers (1e999, 2**40, -1, NaN), keys
dropped, values buried under deep nesting — then read by the runtime loader and by ``moe-tune show``
through the real entry point. On every variant: the runtime returns a config that a launch accepts
and never raises or blocks (strict mode raises only the typed errors); ``show`` exits 0 with JSON
or 2 with one line, never a traceback. Seeded per run (the ``rng`` fixture prints the seed) and
bounded to a few seconds."""

from __future__ import annotations

import copy
import json
import signal
import time
import warnings

import pytest

from moe_tune import runtime
from moe_tune.cache import CacheFile, Pack
from moe_tune.cache.schema import config_out_of_range
from moe_tune.cache.software import Software
from moe_tune.cache.testing import H100, random_cache_file
from moe_tune.errors import CacheError, CacheMissError

BUDGET_S = 3.0
MIN_VARIANTS = 25
SOFTWARE = Software(triton="3.6.0", torch="2.11.0", cuda="13.0", moe_tune="0.1.0", kernel_hash="0123456789abcdef")

# Raw JSON literals, so that numbers Python would never produce (1e999, NaN) reach the reader.
EXTREMES = ["1e999", "-1e999", "NaN", "Infinity", "1e-320", "-1", "0", str(2**40), str(2**63), str(10**30),
            "1.5", "true", "null", '""', '"x"', '"2026-11-27"', '"2026-11-27T13:00:00"', json.dumps("\x1b[2J\n"),
            json.dumps("x" * 5000), "[]", "{}", "[1, 2, 3]"]


def _paths(doc, prefix=()):
    """Every (path, value) in ``doc``, depth first."""
    yield prefix, doc
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            yield from _paths(value, prefix + (i,))


def _put(doc, path, value):
    target = doc
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value


def _mutate_document(rng, doc: dict) -> str:
    doc = copy.deepcopy(doc)
    path, value = rng.choice([p for p in _paths(doc) if p[0]])
    kind = rng.choice(["extreme", "swap", "drop", "nest"])
    if kind == "drop":
        parent = doc
        for step in path[:-1]:
            parent = parent[step]
        del parent[path[-1]]
        return json.dumps(doc)
    if kind == "swap":
        swapped = {int: str, float: str, bool: int, str: lambda v: [v], type(None): lambda v: 0,
                   list: lambda v: {str(i): x for i, x in enumerate(v)}, dict: lambda v: list(v.values())}
        _put(doc, path, swapped[type(value)](value))
        return json.dumps(doc)
    _put(doc, path, "__LITERAL__")
    literal = rng.choice(EXTREMES) if kind == "extreme" else "[" * (d := rng.choice([20, 1000, 100_000])) + \
        json.dumps(value) + "]" * d
    return json.dumps(doc).replace('"__LITERAL__"', literal)


def _mutate_text(rng, text: bytes) -> bytes:
    kind = rng.choice(["truncate", "flip", "insert", "garbage", "prefix"])
    cut = rng.randrange(len(text))
    if kind == "truncate":
        return text[:cut]
    if kind == "flip":
        data = bytearray(text)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    if kind == "insert":
        return text[:cut] + rng.randbytes(rng.randint(1, 64)) + text[cut:]
    if kind == "garbage":
        return rng.randbytes(rng.randint(0, 4096))
    return rng.choice([b"[" * 100_000, b"{\"a\":" * 50_000, b"\xef\xbb\xbf", b"\x00"]) + text


@pytest.fixture
def deadline():
    """A variant that blocks fails the test instead of hanging the suite."""
    def hung(signum, frame):
        raise TimeoutError("a reader blocked for 30 s")

    previous = signal.signal(signal.SIGALRM, hung)
    yield lambda: signal.alarm(30)
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_fuzzed_caches_never_crash_the_runtime_or_show(cli, tmp_path, rng, monkeypatch, deadline):
    cache = random_cache_file(rng, software=SOFTWARE, problems=2, buckets=2)
    problem = cache.problems()[0]
    tokens = min(cache.entries[problem])
    bases = {"cache": cache.to_json(), "pack": Pack([cache]).to_json()}
    target = tmp_path / "c" / cache.name
    target.parent.mkdir()
    runtime_sources, show_codes, variants = set(), set(), 0
    started = time.monotonic()
    while variants < MIN_VARIANTS or time.monotonic() - started < BUDGET_S:
        variants += 1
        base = rng.choice(["cache", "cache", "cache", "pack"])
        text = json.dumps(bases[base]).encode()
        data = _mutate_document(rng, bases[base]).encode() if rng.random() < 0.6 else _mutate_text(rng, text)
        target.write_bytes(data)
        deadline()

        strict = rng.random() < 0.25
        monkeypatch.setenv("MOE_TUNE_STRICT", "1" if strict else "0")
        runtime.set_cache_dir(target.parent)
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            try:
                resolution = runtime.explain(problem, tokens, H100)
            except (CacheError, CacheMissError):
                assert strict, data[:200]
            else:
                assert config_out_of_range(resolution.config) is None, data[:200]
                runtime_sources.add(resolution.source)

        result = cli("show", target, "--json") if rng.random() < 0.8 else cli("show", target, env={"COLUMNS": "200"})
        assert "Traceback" not in result.stderr, (data[:200], result.stderr)
        assert result.code in (0, 2), (data[:200], result.stderr)
        if result.code == 2:
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("moe-tune: error: "), result.stderr
        elif result.stdout.lstrip().startswith("{"):
            json.loads(result.stdout)
        show_codes.add(result.code)
    print(f"{variants} variants; runtime answered from {sorted(runtime_sources)}; show exited {sorted(show_codes)}")
    assert 2 in show_codes and "default" in runtime_sources
    # The unmutated file still reads: the fuzzing damaged copies, not the reader.
    target.write_text(cache.dumps())
    assert CacheFile.loads(target.read_bytes()) == cache
