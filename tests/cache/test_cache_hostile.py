"""Cache files and packs read as hostile input, one test per defect class of issue #15: numbers
that overflow, JSON nested without bound, timestamps without a time zone, config fields outside
what a launch accepts, non-regular files, oversized files, text that cannot reach a terminal; plus
the writer side (nothing written is refused when read) and the store's dry-run preview. Real
files, FIFOs and sparse files; every message one line."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import threading
import time

import pytest

from moe_tune.cache import CacheFile, CacheStore, fields, paths, read_cache_file, schema
from moe_tune.cache.pack import Pack, canonical_sha256
from moe_tune.cache.schema import CONFIG_LIMITS, MAX_TOKENS, PROBLEM_LIMITS, merge_all
from moe_tune.cache.software import Software
from moe_tune.cache.store import read_bytes, read_inputs
from moe_tune.cache.testing import H100, random_cache_file, random_config, random_measurement, random_problem
from moe_tune.errors import CacheError, CacheWarning, InvalidInputError
from moe_tune.problem import Problem

SOFTWARE = Software(triton="3.6.0", torch="2.11.0", cuda="13.0", moe_tune="0.1.0", kernel_hash="0123456789abcdef")


def _doc(rng) -> dict:
    return random_cache_file(rng, software=SOFTWARE, problems=1, buckets=2).to_json()


def _bucket(doc: dict) -> dict:
    return next(iter(doc["entries"].values()))["buckets"][0]


def _refused(text: str | bytes, *words: str) -> str:
    with pytest.raises(CacheError) as info:
        CacheFile.loads(text, "c.json")
    message = str(info.value)
    assert message.startswith("c.json") and "\n" not in message and len(message) < 400, message
    for word in words:
        assert word in message, message
    return message


# -------------------------------------------------------------------------------------------------
# Numbers: finite, and in range for their field
# -------------------------------------------------------------------------------------------------


def _with_literal(doc: dict, path: tuple, literal: str) -> str:
    """``doc`` as JSON text with the value at ``path`` replaced by a raw JSON literal."""
    doc = copy.deepcopy(doc)
    target = doc
    for key in path[:-1]:
        target = target[key] if key != "bucket" else _bucket(doc)
    target[path[-1]] = "__LITERAL__"
    return json.dumps(doc).replace('"__LITERAL__"', literal)


@pytest.mark.parametrize("path, literal, words", [
    (("device", "sm_count"), "1e999", "out of range"),  # overflows to infinity: was an OverflowError everywhere
    (("device", "capability"), "[1e999, 0]", "out of range"),  # inside a list
    (("device", "max_shared_mem"), "-1e999", "out of range"),
    (("bucket", "measurement", "median_ms"), "1e400", "out of range"),
    (("bucket", "tokens"), "1" + "0" * 30, "out of range"),  # an integer no field can hold
    (("bucket", "measurement", "tflops"), "NaN", "not allowed"),  # JSON extensions Python would accept
    (("bucket", "measurement", "tflops"), "-Infinity", "not allowed"),
])
def test_numbers_that_overflow_are_refused(rng, path, literal, words):
    _refused(_with_literal(_doc(rng), path, literal), words)


CONFIG_FIELDS_OUT_OF_RANGE = [
    ("num_warps", 1 << 20),  # was returned to the kernels as is
    ("num_warps", 64),  # a power of two, but 2048 threads
    ("num_stages", 1 << 20),
    ("num_stages", 17),
    ("BLOCK_M", 1 << 40),
    ("BLOCK_N", 2048),  # a 2048 x 1024 tile passes Triton's 2^20 elements
    ("BLOCK_K", 8),  # below tl.dot's 16
    ("GROUP_M", 1 << 40),
    ("GROUP_M", 0),
]


@pytest.mark.parametrize("name, value", CONFIG_FIELDS_OUT_OF_RANGE)
def test_config_fields_outside_a_launch_are_refused(rng, name, value):
    doc = _doc(rng)
    _bucket(doc)["config"][name] = value
    _refused(json.dumps(doc), "config", name)


def test_config_limits_themselves_are_accepted(rng):
    doc = _doc(rng)
    for bound in (0, 1):
        for name, limits in CONFIG_LIMITS.items():
            _bucket(doc)["config"][name] = limits[bound]
        assert CacheFile.loads(json.dumps(doc))


@pytest.mark.parametrize("where, value", [
    (("problem", "E"), PROBLEM_LIMITS["E"][1] + 1),
    (("problem", "N"), 1 << 40),
    (("problem", "topk"), 1 << 40),
    (("bucket", "tokens"), MAX_TOKENS + 1),
    (("bucket", "measurement", "candidates"), 1 << 40),
    (("bucket", "measurement", "median_ms"), 1e300),
    (("bucket", "measurement", "spread_ms"), -1),
])
def test_other_numbers_out_of_range_are_refused(rng, where, value):
    doc = _doc(rng)
    if where[0] == "problem":
        # Re-keyed, so that the key still matches its problem and the range is what fails.
        (entry,) = doc["entries"].values()
        entry["problem"][where[1]] = value
        doc["entries"] = {Problem.from_dict(entry["problem"]).key: entry}
    else:
        target = _bucket(doc)
        for key in where[1:-1]:
            target = target[key]
        target[where[-1]] = value
    _refused(json.dumps(doc), where[-1])


def test_device_numbers_are_bounded(rng):
    for key, value in [("sm_count", 0), ("sm_count", 1 << 40), ("max_shared_mem", 1 << 40),
                       ("capability", [9, 1000]), ("capability", [9]), ("capability", [9.0, 0])]:
        doc = _doc(rng)
        doc["device"][key] = value
        _refused(json.dumps(doc), "device", key)


# -------------------------------------------------------------------------------------------------
# Nesting, size, text
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "[" * 100_000,  # the reproduction: was a RecursionError everywhere
    "[" * 100_000 + "]" * 100_000,
    '{"a":' * 50_000 + "1" + "}" * 50_000,
    "[" + "[1," * 40 + "1" + "]" * 40 + "]",  # not consecutive
    "[" + "[[],{}," * 20 + "[" * 20 + "]" * 20 + "]" * 20 + "]",  # each level padded with closed ones
])
def test_deep_nesting_is_refused_before_parsing(text):
    _refused(text, "nested more than")


def test_nesting_up_to_the_limit_parses(rng):
    doc = _doc(rng)
    # Minor versions may add metadata: a nested extra key up to the limit is read and ignored.
    doc["provenance"]["extra"] = json.loads("[" * (fields.MAX_DEPTH - 2) + "]" * (fields.MAX_DEPTH - 2))
    assert CacheFile.loads(json.dumps(doc)).device == H100
    doc["provenance"]["extra"] = json.loads("[" * (fields.MAX_DEPTH - 1) + "]" * (fields.MAX_DEPTH - 1))
    _refused(json.dumps(doc), "nested more than")


def test_brackets_inside_strings_are_text(rng):
    doc = _doc(rng)
    doc["provenance"]["writes"][0]["command"] = "[" * 3000 + ' \\" {' * 100 + "]" * 7
    assert CacheFile.loads(json.dumps(doc)).provenance.writes[0].command.startswith("[[[")


def test_too_many_containers_are_refused_unparsed():
    _refused("[" + "[]," * (fields.MAX_CONTAINERS + 1) + "[]]", "objects and lists")


@pytest.mark.parametrize("where, value, words", [
    (("device", "name"), "NVIDIA\nH100", "printable"),  # would break a one-line message
    (("device", "name"), "H100 \x1b[2J", "printable"),  # a terminal escape sequence
    (("device", "name"), "x" * 1000, "longer than"),
    (("device", "name"), "", "empty"),
    (("software", "triton"), "\ud800", "Unicode"),  # a lone surrogate cannot be written as UTF-8
    (("provenance", "writes", 0, "command"), "\udcff", "Unicode"),
])
def test_text_that_cannot_reach_a_terminal_or_a_file_is_refused(rng, where, value, words):
    doc = _doc(rng)
    target = doc
    for key in where[:-1]:
        target = target[key]
    target[where[-1]] = value
    _refused(json.dumps(doc), words)


# -------------------------------------------------------------------------------------------------
# Timestamps: strict, aware
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stamp", [
    "2026-11-27T13:00:00",  # no time zone: was accepted, then crashed every merge
    "2026-11-27",  # a date only
    "2026-11-27 13:00:00Z",  # a space for the T
    "2026-11-27T13:00:00+25:00",  # no such offset
    "2026-02-30T00:00:00Z",  # no such day
    "0001-01-01T00:00:00+01:00",  # before year 1 in UTC
    "２０２６-11-27T13:00:00Z",  # full-width digits
    20261127,
])
def test_timestamps_without_a_zone_or_malformed_are_refused(rng, stamp):
    for where in (("bucket", "measurement", "measured_at"), ("provenance", "created")):
        doc = _doc(rng)
        target = _bucket(doc)["measurement"] if where[0] == "bucket" else doc["provenance"]
        target[where[-1]] = stamp
        _refused(json.dumps(doc), where[-1])


def test_timestamps_with_offsets_compare_in_utc(rng):
    assert fields.parse_time("2026-11-27T14:00:00+01:00") == fields.parse_time("2026-11-27T13:00:00Z")
    assert fields.parse_time("2026-11-27T13:00:00.5Z").microsecond == 500_000
    a = random_cache_file(rng, software=SOFTWARE, problems=1, buckets=1)
    problem, = a.entries
    tokens, = a.entries[problem]
    other = dataclasses.replace(SOFTWARE, torch="2.12.0")
    old = dataclasses.replace(random_measurement(rng), measured_at="2026-11-27T14:00:00+02:00")  # 12:00 UTC
    new = dataclasses.replace(random_measurement(rng), measured_at="2026-11-27T07:30:00-05:00")  # 12:30 UTC
    a.entries[problem][tokens] = schema.BucketEntry(random_config(rng), old, SOFTWARE)
    b = CacheFile.loads(a.dumps())
    b.entries[problem][tokens] = schema.BucketEntry(random_config(rng), new, other)
    assert a.merge(b).replaced == 1 and a.get(problem, tokens).measurement == new


def test_store_replaces_an_existing_file_with_naive_timestamps(tmp_path, rng):
    # The store's own write path used to end in "can't compare offset-naive and offset-aware".
    cache = random_cache_file(rng, software=SOFTWARE)
    doc = cache.to_json()
    doc["provenance"]["created"] = "2026-11-27T13:00:00"
    (tmp_path / cache.name).write_text(json.dumps(doc))
    with pytest.warns(CacheWarning, match="created"):
        result = CacheStore(tmp_path).write(cache)
    assert read_cache_file(result.path) == cache


# -------------------------------------------------------------------------------------------------
# Files that are not regular, or too large
# -------------------------------------------------------------------------------------------------


def _within(seconds: float, fn):
    """fn's outcome (value or exception), or a failure if it is still running after ``seconds``."""
    outcome = {}

    def run():
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # handed back to the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "blocked"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def test_a_fifo_named_like_a_cache_file_is_refused_without_blocking(tmp_path, rng):
    fifo = tmp_path / random_cache_file(rng).name
    os.mkfifo(fifo)
    with pytest.raises(CacheError, match="not a regular file"):
        _within(5, lambda: read_cache_file(fifo))
    with pytest.raises(CacheError, match="not a regular file"):
        _within(5, lambda: read_inputs(fifo))
    assert _within(5, lambda: paths.Layer("x", tmp_path).cache_files()) == []  # listing skips it
    assert _within(5, lambda: read_inputs(tmp_path)) == []


def test_a_directory_named_like_a_cache_file_is_skipped(tmp_path, rng):
    cache = random_cache_file(rng, software=SOFTWARE)
    (tmp_path / cache.name).mkdir()
    assert paths.Layer("x", tmp_path).cache_files() == []
    with pytest.raises(CacheError, match="a directory"):
        read_cache_file(tmp_path / cache.name)


def test_oversized_files_are_refused_unread(tmp_path):
    sparse = tmp_path / "big.json"
    with open(sparse, "wb") as handle:
        handle.truncate(fields.MAX_FILE_BYTES + 1)  # sparse: reading it would take seconds
    started = time.monotonic()
    with pytest.raises(CacheError, match="larger than"):
        read_bytes(sparse)
    assert time.monotonic() - started < 1
    with pytest.raises(CacheError, match="larger than"):
        fields.loads(b" " * (fields.MAX_FILE_BYTES + 1), "x")


def test_an_unreadable_regular_file_is_a_cache_error():
    # /proc/self/mem is a regular file no one can read from offset 0, root included.
    if not os.path.exists("/proc/self/mem"):
        pytest.skip("needs Linux /proc")
    with pytest.raises(CacheError, match="cannot read"):
        read_cache_file("/proc/self/mem")


# -------------------------------------------------------------------------------------------------
# Writers are held to what readers accept
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, value", CONFIG_FIELDS_OUT_OF_RANGE[:6])
def test_add_refuses_configs_readers_would_refuse(rng, name, value):
    cache = random_cache_file(rng, software=SOFTWARE, problems=0)
    config = dataclasses.replace(random_config(rng), **{name: value})
    with pytest.raises(InvalidInputError, match=name):
        cache.add(random_problem(rng), 4096, config, random_measurement(rng))
    with pytest.raises(InvalidInputError, match="token bucket"):
        cache.add(random_problem(rng), MAX_TOKENS + 1, random_config(rng), random_measurement(rng))


def test_measurement_refuses_what_readers_refuse(rng):
    m = random_measurement(rng)
    for name, value in [("median_ms", 1e300), ("tflops", float("inf")), ("measured_at", "2026-11-27T13:00:00")]:
        with pytest.raises(InvalidInputError, match=name):
            dataclasses.replace(m, **{name: value})


def test_a_command_line_that_is_not_utf8_is_written_readably(tmp_path, rng):
    cache = CacheFile.new(H100, SOFTWARE, command="moe-tune sweep -o /data/\udcff" + "x" * 10_000)
    cache.add(random_problem(rng), 64, random_config(rng), random_measurement(rng))
    written = read_cache_file(CacheStore(tmp_path).write(cache).path)
    assert written.provenance.writes[0].command.startswith("moe-tune sweep -o /data/\\udcff")


def test_new_refuses_devices_readers_would_refuse():
    for device in (dataclasses.replace(H100, name="bad\nname"), dataclasses.replace(H100, sm_count=0),
                   dataclasses.replace(H100, capability=(9, 100))):
        with pytest.raises(InvalidInputError):
            CacheFile.new(device, SOFTWARE, command="x")


# -------------------------------------------------------------------------------------------------
# Merges that cannot happen say what differs; previews fail where writes fail
# -------------------------------------------------------------------------------------------------


def test_same_name_other_capability_says_what_differs(tmp_path, rng):
    a = random_cache_file(rng, software=SOFTWARE)
    b = random_cache_file(rng, device=dataclasses.replace(H100, capability=(8, 0)), software=SOFTWARE)
    with pytest.raises(CacheError, match=r"compute capability 9\.0 vs 8\.0") as info:
        merge_all([a, b])
    assert "sm 9.0" in str(info.value) and "sm 8.0" in str(info.value)
    store = CacheStore(tmp_path)
    store.write(a)
    for attempt in (store.preview, store.write):
        with pytest.raises(CacheError, match=r"compute capability 9\.0 vs 8\.0"):
            attempt(b)


@pytest.mark.parametrize("blocker", ["the directory", "a parent"])
def test_preview_fails_where_write_fails(tmp_path, rng, blocker):
    cache = random_cache_file(rng, software=SOFTWARE)
    if blocker == "the directory":
        directory = tmp_path / "cache"
        directory.write_text("a regular file, not a directory")
    else:
        (tmp_path / "parent").write_text("")
        directory = tmp_path / "parent" / "cache"
    store = CacheStore(directory)
    with pytest.raises(CacheError, match="cannot create the cache directory"):
        store.preview(cache)
    with pytest.raises(CacheError, match="cannot create the cache directory"):
        store.write(cache)


def test_preview_counts_what_write_does_and_writes_nothing(tmp_path, rng):
    first = random_cache_file(rng, software=SOFTWARE)
    store = CacheStore(tmp_path / "c")
    assert store.preview(first).stats.added == len(first) and not (tmp_path / "c").exists()
    store.write(first)
    second = CacheFile.loads(first.dumps())
    second.add(random_problem(rng), 77, random_config(rng), random_measurement(rng))
    before = sorted(p.name for p in (tmp_path / "c").iterdir())
    previewed = store.preview(second)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == before
    assert previewed == store.write(second)


def test_pack_checksum_and_manifest_on_hostile_content(rng):
    doc = Pack([random_cache_file(rng, software=SOFTWARE)]).to_json()
    damaged = copy.deepcopy(doc)
    damaged["sha256"] = {"not": "a string"}
    with pytest.raises(CacheError, match="sha256"):
        Pack.loads(json.dumps(damaged))
    damaged = copy.deepcopy(doc)
    damaged["manifest"]["created"] = "2026-11-27"
    damaged["sha256"] = canonical_sha256({k: v for k, v in damaged.items() if k != "sha256"})
    with pytest.raises(CacheError, match="created"):
        Pack.loads(json.dumps(damaged))
