"""Cache schema: round trips, stable text, validation of every damaged form, versions, merge rule,
packs. Every test draws fresh random entries (seed printed by the ``rng`` fixture)."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest

from moe_tune.cache import pack, schema
from moe_tune.cache.pack import Pack
from moe_tune.cache.schema import CacheFile, pick
from moe_tune.cache.testing import H100, random_cache_file, random_config, random_measurement, random_problem, random_software
from moe_tune.errors import CacheError, CacheVersionError, InvalidInputError


def test_round_trip_is_exact_and_text_is_stable(rng):
    cache = random_cache_file(rng, problems=4, buckets=3)
    text = cache.dumps()
    back = CacheFile.loads(text)
    assert back == cache
    assert back.dumps() == text  # re-serialising changes nothing: diffs show only real changes
    doc = json.loads(text)
    assert list(doc) == ["schema_version", "kind", "device", "software", "provenance", "entries"]
    assert list(doc["entries"]) == sorted(doc["entries"])
    for key, entry in doc["entries"].items():
        tokens = [b["tokens"] for b in entry["buckets"]]
        assert tokens == sorted(tokens)
        assert entry["problem"]["pass"] == key.split("/")[0]
    assert '"capability": [9, 0]' in text


def test_keys_are_clear_text_problem_keys(rng):
    cache = random_cache_file(rng, problems=2, buckets=1)
    doc = cache.to_json()
    assert set(doc["entries"]) == {p.key for p in cache.problems()}


def _damage(doc: dict, path: list, value) -> dict:
    doc = copy.deepcopy(doc)
    target = doc
    for step in path[:-1]:
        target = target[step] if not callable(step) else step(target)
    target[path[-1]] = value
    return doc


def _first_entry(entries: dict) -> dict:
    return entries[next(iter(entries))]


# (where, value, words the message must contain): each a different wrong-typed field
WRONG_TYPES = [
    (["device", "capability"], "9.0", "device"),  # capability as a string
    (["device"], [], "device"),  # device as a list
    (["software", "triton"], 3.6, "software.triton"),  # version as a number
    (["entries"], [], "entries"),  # entries as a list
    (["entries", _first_entry, "buckets"], {}, "buckets"),  # buckets as an object
    (["entries", _first_entry, "buckets", 0, "tokens"], "4096", "tokens"),  # bucket as a string
    (["entries", _first_entry, "buckets", 0, "tokens"], 0, "tokens"),  # bucket 0
    (["entries", _first_entry, "buckets", 0, "config", "BLOCK_M"], 48, "BLOCK_M"),  # not a power of two
    (["entries", _first_entry, "buckets", 0, "config", "BLOCK_M"], True, "BLOCK_M"),  # bool for an int
    (["entries", _first_entry, "buckets", 0, "measurement", "median_ms"], -1.0, "median_ms"),
    (["entries", _first_entry, "buckets", 0, "measurement", "median_ms"], None, "median_ms"),
    (["entries", _first_entry, "buckets", 0, "measurement", "correct"], "yes", "correct"),
    (["entries", _first_entry, "buckets", 0, "measurement", "measured_at"], "yesterday", "measured_at"),
    (["entries", _first_entry, "problem", "E"], -4, "E"),
    (["provenance", "writes"], "none", "writes"),
    (["schema_version"], 1, "schema_version"),
]


@pytest.mark.parametrize("path, value, words", WRONG_TYPES)
def test_wrong_typed_fields_are_cache_errors_naming_the_field(rng, path, value, words):
    doc = _damage(random_cache_file(rng, problems=1, buckets=2).to_json(), path, value)
    with pytest.raises(CacheError) as info:
        CacheFile.from_json(doc, "x.json")
    message = str(info.value)
    assert words in message and message.startswith("x.json")
    assert "\n" not in message


def test_entry_key_must_match_its_problem(rng):
    doc = random_cache_file(rng, problems=1, buckets=1).to_json()
    (key, entry), = doc["entries"].items()
    doc["entries"] = {key.replace("/E", "/E9"): entry}
    with pytest.raises(CacheError, match="does not match"):
        CacheFile.from_json(doc)


@pytest.mark.parametrize("text, words", [
    (b"", "empty"),  # empty file
    (b"   \n", "empty"),  # whitespace only
    (b"{\"schema_version\": \"1.0\", \"kind\": \"moe-", "not valid JSON"),  # truncated mid-write
    (b"\xff\xfe\x00", "UTF-8"),  # binary garbage
    (b"[1, 2, 3]", "expected an object"),  # JSON, wrong top-level type
    (b"{\"kind\": \"moe-tune-cache\"}", "schema_version"),  # JSON object, not a cache
    (b"{\"schema_version\": \"1.0\", \"kind\": \"other\"}", "kind"),  # someone else's file
    (b"{\"x\": NaN}", "NaN"),  # JSON extension Python would accept
])
def test_damaged_text_is_a_cache_error(text, words):
    with pytest.raises(CacheError, match=words):
        CacheFile.loads(text, "c.json")


def test_truncated_real_file_is_a_cache_error_at_every_cut(rng):
    text = random_cache_file(rng, problems=1, buckets=1).dumps()
    for cut in sorted(rng.sample(range(1, len(text) - 2), 12)):
        with pytest.raises(CacheError):
            CacheFile.loads(text[:cut])


def test_future_major_version_is_refused_with_a_clear_message(rng):
    doc = random_cache_file(rng, problems=1, buckets=1).to_json()
    doc["schema_version"] = "4.0"
    with pytest.raises(CacheVersionError, match=r"newer moe-tune \(schema 4\.0.*upgrade moe-tune"):
        CacheFile.from_json(doc, "f.json")


def test_newer_minor_version_is_read_ignoring_added_metadata(rng):
    cache = random_cache_file(rng, problems=1, buckets=1)
    doc = cache.to_json()
    doc["schema_version"] = "3.7"
    doc["provenance"]["host_fingerprint"] = "abc"
    _first_entry(doc["entries"])["buckets"][0]["measurement"]["p99_ms"] = 1.5
    assert CacheFile.from_json(doc) == cache


def test_older_major_version_is_migrated_step_by_step(rng, monkeypatch):
    cache = random_cache_file(rng, problems=1, buckets=2)
    current = cache.to_json()
    # A pretend major 0 that called entries "problems": the registered migration renames it back.
    old = {k if k != "entries" else "problems": v for k, v in current.items()}
    old["schema_version"] = "0.3"

    def from_v0(doc):
        doc["entries"] = doc.pop("problems")
        doc["schema_version"] = "1.0"
        return doc

    monkeypatch.setitem(schema._MIGRATIONS, 0, from_v0)
    assert CacheFile.from_json(old) == cache
    monkeypatch.delitem(schema._MIGRATIONS, 0)
    with pytest.raises(CacheVersionError, match="too old"):
        CacheFile.from_json(old)


def test_measurement_rejects_bad_values_and_rounds(rng):
    m = random_measurement(rng)
    assert m.median_ms == float(f"{m.median_ms:.6g}")
    with pytest.raises(InvalidInputError):
        dataclasses.replace(m, median_ms=float("nan"))
    with pytest.raises(InvalidInputError):
        dataclasses.replace(m, candidates=-1)
    assert dataclasses.replace(m, default_ms=None).speedup is None
    assert m.speedup == pytest.approx(m.default_ms / m.median_ms)


# -------------------------------------------------------------------------------------------------
# Merge rule
# -------------------------------------------------------------------------------------------------


def _entry(rng, software, median, correct=True, at="2026-01-01T00:00:00Z"):
    m = dataclasses.replace(random_measurement(rng), median_ms=median, correct=correct, measured_at=at)
    return schema.BucketEntry(random_config(rng), m, software)


def test_merge_rule_same_software_keeps_the_faster(rng):
    sw = random_software(rng)
    slow, fast = _entry(rng, sw, 2.0), _entry(rng, sw, 1.0)
    assert pick(slow, fast) is fast and pick(fast, slow) is fast
    tie = _entry(rng, sw, 2.0)
    assert pick(slow, tie) is slow  # a tie keeps what is there: repeated merges are stable


def test_merge_rule_gate_beats_speed(rng):
    sw = random_software(rng)
    checked, failed = _entry(rng, sw, 5.0), _entry(rng, sw, 0.1, correct=False)
    assert pick(checked, failed) is checked and pick(failed, checked) is checked


def test_merge_rule_other_software_takes_the_later_measurement(rng):
    old_sw, new_sw = random_software(rng), random_software(rng)
    old = _entry(rng, old_sw, 0.5, at="2026-01-01T00:00:00Z")
    new = _entry(rng, new_sw, 0.9, at="2026-06-01T00:00:00Z")
    assert pick(old, new) is new and pick(new, old) is new


def test_cache_merge_counts_and_refuses_other_targets(rng):
    sw = random_software(rng)
    a = random_cache_file(rng, software=sw, problems=2, buckets=2)
    b = CacheFile.loads(a.dumps())
    problem = a.problems()[0]
    tokens = next(iter(a.entries[problem]))
    faster = dataclasses.replace(a.get(problem, tokens).measurement, median_ms=a.get(problem, tokens).measurement.median_ms / 2)
    b.add(problem, tokens, random_config(rng), faster)
    new_problem = random_problem(rng)
    b.add(new_problem, 64, random_config(rng), random_measurement(rng))
    stats = a.merge(b)
    assert (stats.added, stats.replaced, stats.kept) == (1, 1, len(a) - 2)
    assert a.get(problem, tokens).measurement == faster
    other_device = CacheFile.new(dataclasses.replace(H100, name="NVIDIA H200"), sw, command="x")
    with pytest.raises(CacheError, match="one device"):
        a.merge(other_device)
    with pytest.raises(InvalidInputError, match="one Triton version"):
        a.add(problem, 1, random_config(rng), random_measurement(rng), software=random_software(rng, triton="3.5.0"))


# -------------------------------------------------------------------------------------------------
# Packs
# -------------------------------------------------------------------------------------------------


def test_pack_round_trip_and_checksum(rng):
    caches = [random_cache_file(rng), random_cache_file(rng, device=dataclasses.replace(H100, name="NVIDIA H200"))]
    doc = Pack(caches, command="moe-tune export", model="qwen3-30b-a3b").to_json()
    assert doc["sha256"] == pack.canonical_sha256({k: v for k, v in doc.items() if k != "sha256"})
    back = Pack.loads(json.dumps(doc))
    assert sorted(back.caches, key=lambda c: c.name) == sorted(caches, key=lambda c: c.name)
    # Whitespace does not matter (the checksum is over the canonical form), content does.
    assert Pack.from_json(json.loads(json.dumps(doc, indent=7))).model == "qwen3-30b-a3b"
    tampered = copy.deepcopy(doc)
    _first_entry(tampered["caches"][0]["entries"])["buckets"][0]["config"]["BLOCK_M"] = 256
    with pytest.raises(CacheError, match="checksum mismatch"):
        Pack.from_json(tampered)


def test_pack_manifest_names_must_match_content(rng):
    doc = Pack([random_cache_file(rng)]).to_json()
    doc["manifest"]["files"][0]["name"] = "../../etc__triton-3.6.0.json"
    doc["sha256"] = pack.canonical_sha256({k: v for k, v in doc.items() if k != "sha256"})
    with pytest.raises(CacheError, match="named"):
        Pack.from_json(doc)


def test_pack_and_cache_kinds_are_not_confused(rng):
    cache = random_cache_file(rng)
    with pytest.raises(CacheError, match="expected a pack"):
        Pack.from_json(cache.to_json())
    with pytest.raises(CacheError, match="moe-tune install"):
        CacheFile.from_json(Pack([cache]).to_json())
    assert pack.load_any(Pack([cache]).dumps(), "p")[0] == schema.PACK_KIND


@pytest.mark.parametrize("version, absent", [("1.0", ("WARP_SPEC", "PROGRAMS_PER_SM")), ("2.0", ("PROGRAMS_PER_SM",))])
def test_older_schemas_read_as_configs_without_the_keys_they_lacked(rng, version, absent):
    cache = random_cache_file(rng, problems=2, buckets=2)
    doc = cache.to_json()
    assert doc["schema_version"] == "3.0"
    doc["schema_version"] = version
    defaults = {"WARP_SPEC": False, "PROGRAMS_PER_SM": 1}
    for entry in doc["entries"].values():
        for bucket in entry["buckets"]:
            for key in absent:  # what a writer of that schema left out
                assert bucket["config"].pop(key) == defaults[key]
    read = CacheFile.from_json(doc, "old.json")
    assert read == cache
    assert all(not e.config.WARP_SPEC and e.config.PROGRAMS_PER_SM == 1
               for buckets in read.entries.values() for e in buckets.values())
    assert read.to_json()["schema_version"] == "3.0"
