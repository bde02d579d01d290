"""The sweep journal (moe_tune/tuning/journal.py): append-only JSONL that survives a kill at any
byte, and refuses to resume a sweep with other settings."""

from __future__ import annotations

import json

import pytest

from moe_tune.errors import CacheError, InvalidInputError
from moe_tune.tuning.journal import Journal, read_records

SETTINGS = {"model": "tiny", "tokens": [32, 64], "routing": "uniform"}


def records(rng, n):
    return [{"type": "measure", "i": i, "ms": rng.random()} for i in range(n)]


def test_records_round_trip_in_order(tmp_path, rng):
    path = tmp_path / "j" / "sweep.jsonl"
    written = records(rng, rng.randint(3, 20))
    with Journal.open(path, SETTINGS, resume=False) as journal:
        for record in written:
            journal.append(record)
    back = read_records(path)
    assert back[0] == {"type": "header", "version": 1, "settings": SETTINGS}
    assert back[1:] == written


def test_resume_keeps_records_and_appends(tmp_path, rng):
    path = tmp_path / "sweep.jsonl"
    first, second = records(rng, 4), records(rng, 3)
    with Journal.open(path, SETTINGS, resume=False) as journal:
        for record in first:
            journal.append(record)
    with Journal.open(path, SETTINGS, resume=True) as journal:
        assert [r for r in journal.records if r["type"] == "measure"] == first
        for record in second:
            journal.append(record)
    assert read_records(path)[1:] == first + second


def test_a_torn_last_line_is_dropped_and_cut(tmp_path, rng):
    # What a kill in the middle of write() leaves behind.
    path = tmp_path / "sweep.jsonl"
    kept = records(rng, 5)
    with Journal.open(path, SETTINGS, resume=False) as journal:
        for record in kept:
            journal.append(record)
    torn = json.dumps({"type": "measure", "i": 99})
    with open(path, "ab") as f:
        f.write(torn[: rng.randint(1, len(torn) - 1)].encode())
    assert read_records(path)[1:] == kept
    with Journal.open(path, SETTINGS, resume=True) as journal:
        journal.append({"type": "measure", "i": 100})
    assert [r["i"] for r in read_records(path)[1:]] == [r["i"] for r in kept] + [100]


def test_a_damaged_middle_line_is_an_error(tmp_path):
    path = tmp_path / "sweep.jsonl"
    path.write_text(json.dumps({"type": "header", "version": 1, "settings": SETTINGS}) + "\n{oops\n" + "{}\n")
    with pytest.raises(CacheError, match="corrupt at line 2"):
        read_records(path)


def test_resume_refuses_other_settings(tmp_path):
    path = tmp_path / "sweep.jsonl"
    Journal.open(path, SETTINGS, resume=False).close()
    with pytest.raises(InvalidInputError, match="tokens"):
        Journal.open(path, {**SETTINGS, "tokens": [32]}, resume=True)


def test_without_resume_a_journal_starts_over_and_keeps_the_old_one(tmp_path, rng):
    # A second sweep into the same directory starts a fresh journal; the first one's records move
    # to sweep.1.jsonl, a third sweep's predecessor to sweep.2.jsonl, and so on.
    path = tmp_path / "sweep.jsonl"
    written = []
    for run in range(3):
        with Journal.open(path, {**SETTINGS, "run": run}, resume=False) as journal:
            written.append(records(rng, 2 + run))
            for record in written[-1]:
                journal.append(record)
    assert read_records(path)[1:] == written[2]
    for n in (1, 2):
        kept = read_records(tmp_path / f"sweep.{n}.jsonl")
        assert kept[0]["settings"]["run"] == n - 1 and kept[1:] == written[n - 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.1.jsonl", "sweep.2.jsonl", "sweep.jsonl"]
    # An empty journal (a sweep killed before its header) is not worth keeping.
    path.write_bytes(b"")
    Journal.open(path, SETTINGS, resume=False).close()
    assert not (tmp_path / "sweep.3.jsonl").exists()
    assert read_records(path) == [{"type": "header", "version": 1, "settings": SETTINGS}]
