"""The sweep's append-only journal: one JSON record per line, fsynced as it is written.

Data flow: the sweep opens a ``Journal`` beside the cache it writes; the first record is a header
holding the sweep's settings; every compile result, every measurement and every finished bucket
is appended as soon as it exists. ``--resume`` reads the file back (``Journal.open(resume=True)``):
measurements become a memo the search replays instead of re-running, finished buckets are
skipped, so a sweep killed or crashed at any point redoes at most the measurement in flight.

A process killed mid-``write`` leaves a torn last line; the reader drops it (and only it: a torn
line anywhere else means the file was edited, which is a ``CacheError``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

from moe_tune.errors import CacheError, InvalidInputError

JOURNAL_VERSION = 1


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every complete record of a journal file, in order (a torn last line is dropped)."""
    path = Path(path)
    try:
        lines = path.read_bytes().split(b"\n")
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise CacheError(f"cannot read the sweep journal {path}: {exc.strerror or exc}") from None
    records = []
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except ValueError:
            if i == last:
                break  # torn by a kill mid-write
            raise CacheError(f"sweep journal {path} is corrupt at line {i + 1}; delete it or run without --resume") from None
        records.append(record)
    return records


def _settings_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


class Journal:
    """Append-only JSONL writer (fsync per record) plus what a resumed file already holds."""

    def __init__(self, path: Path, records: list[dict[str, Any]]):
        self.path = path
        self.records = records
        self._file = open(path, "ab")

    @classmethod
    def open(cls, path: str | os.PathLike, settings: Mapping[str, Any], *, resume: bool) -> "Journal":
        """Start a journal at ``path``. With ``resume``, keep an existing one whose header holds the
        same ``settings`` (else ``InvalidInputError`` naming what differs); without, start over."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        records = read_records(path) if resume else []
        if records:
            header = records[0]
            if header.get("type") != "header" or header.get("version") != JOURNAL_VERSION:
                raise CacheError(f"{path} is not a moe-tune sweep journal (version {JOURNAL_VERSION})")
            differs = _settings_diff(header.get("settings", {}), settings)
            if differs:
                raise InvalidInputError(
                    f"cannot resume: the journal {path} was written by a sweep with other settings "
                    f"({', '.join(differs)}); run without --resume to start over"
                )
            if path.stat().st_size and not path.read_bytes().endswith(b"\n"):
                # Cut the torn last line so the next record starts on a line of its own.
                with open(path, "r+b") as f:
                    data = f.read()
                    f.truncate(data.rfind(b"\n") + 1)
            journal = cls(path, records)
        else:
            path.write_bytes(b"")
            journal = cls(path, [])
            journal.append({"type": "header", "version": JOURNAL_VERSION, "settings": dict(settings)})
        return journal

    def append(self, record: Mapping[str, Any]) -> None:
        line = json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n"
        self._file.write(line.encode())
        self._file.flush()
        # fsync per record: a crash (or a GPU fault that takes the host driver down) loses nothing
        # that was reported. Records are ~300 bytes and a sweep writes a few thousand.
        os.fsync(self._file.fileno())
        self.records.append(dict(record))

    def of_type(self, kind: str) -> Iterator[dict[str, Any]]:
        return (r for r in self.records if r.get("type") == kind)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
