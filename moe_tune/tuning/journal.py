"""The sweep's append-only journal: one JSON record per line, fsynced as it is written.

Data flow: the sweep opens a ``Journal`` beside the cache it writes; the first record is a header
holding the sweep's settings; every compile result, every measurement and every finished bucket
is appended as soon as it exists. ``--resume`` reads the file back (``Journal.open(resume=True)``):
measurements become a memo the search replays instead of re-running, finished buckets are
skipped, so a sweep killed or crashed at any point redoes at most the measurement in flight.

A process killed mid-``write`` leaves a torn last line; the reader drops it (and only it: a torn
line anywhere else means the file was edited, which is a ``CacheError``).

Naming: ``journal_path`` gives each process that writes (a plain sweep, a shard, a torchrun rank)
its own file under ``<cache dir>/journals/``; ``journal_settings`` is the header a resumed sweep
must match; ``sibling_records`` reads the other journals of the same sweep (other ranks, shards or
GPU counts), so a resumed sweep in any layout measures only what none of them holds.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from moe_tune.errors import CacheError, InvalidInputError, MoeTuneError
from moe_tune.slug import slug

if TYPE_CHECKING:
    from moe_tune.device import DeviceInfo
    from moe_tune.models import ModelSpec
    from moe_tune.problem import Problem
    from moe_tune.tuning.options import SweepOptions

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
        same ``settings`` (else ``InvalidInputError`` naming what differs); without, start a new
        one there and keep the one it replaces as ``<name>.<n>.jsonl`` (``archive``): a second
        sweep into the same directory (other passes, other token counts) must not erase the
        first one's measurements."""
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
            archive(path)
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

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Naming
# ---------------------------------------------------------------------------------------------


def archive(path: Path) -> Path | None:
    """Rename a non-empty journal at ``path`` to the first free ``<stem>.<n>.jsonl`` beside it and
    return the new path (None when there was nothing to keep). ``sibling_records`` never reads
    these: they belong to finished or abandoned sweeps, kept for the record (and for
    ``benchmarks/cost_model_check.py``)."""
    try:
        if path.stat().st_size == 0:
            return None
    except FileNotFoundError:
        return None
    stem = path.name.removesuffix(".jsonl")
    n = 1
    while (path.parent / f"{stem}.{n}.jsonl").exists():
        n += 1
    kept = path.parent / f"{stem}.{n}.jsonl"
    try:
        os.replace(path, kept)
    except OSError as exc:
        raise CacheError(f"cannot keep the previous sweep journal {path} as {kept.name}: "
                         f"{exc.strerror or exc}") from None
    return kept


def journal_settings(options: SweepOptions, device: DeviceInfo, problems: list[Problem]) -> dict[str, Any]:
    """What a resumed sweep must share with the journal it continues."""
    from moe_tune import __version__
    from moe_tune.cache.software import kernel_source_hash, triton_version

    shape = options.model.shape
    return {
        "model": options.model.name,
        "shape": {"E": shape.E, "H": shape.H, "I": shape.I, "topk": shape.topk},
        "problems": [p.key for p in problems],
        "tokens": list(options.tokens),
        "routing": options.routing.identity(),
        "seed": options.seed,
        "space": options.space,
        "policy": options.policy.to_dict(),
        "device": device.to_dict(),
        "triton": triton_version(),
        "kernel_hash": kernel_source_hash(),
        "moe_tune": __version__,
    }


def journal_path(cache_dir: Path, model: ModelSpec, device: DeviceInfo, dtype: str,
                 split: Mapping[str, Any] | None = None) -> Path:
    """``journals/sweep-<model>-<dtype>-<device>[-shard{i}of{n} | -rank{r}of{n}].jsonl``: one file
    per process that writes, so ranks and shards never share one."""
    suffix = ""
    if split is not None and split["kind"] != "all":
        suffix = f"-{'rank' if split['kind'] == 'torchrun' else 'shard'}{split['index']}of{split['count']}"
    name = slug(model.name, dots=True, fallback="model")
    gpu = slug(device.name, fallback="unknown-device")
    return cache_dir / "journals" / f"sweep-{name}-{dtype}-{gpu}{suffix}.jsonl"


def sibling_records(path: Path, settings: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The records of the other journals of the same sweep (same settings but the split) beside
    ``path``: what other ranks, shards or a run with other GPUs already finished."""
    base = dict(settings, split=None)
    stem = path.name.split("-rank")[0].split("-shard")[0].removesuffix(".jsonl")
    found = []
    for other in sorted(path.parent.glob(f"{stem}*.jsonl")):
        if other == path:
            continue
        rest = other.name[len(stem):].removesuffix(".jsonl")
        if rest and not re.fullmatch(r"-(rank|shard)\d+of\d+", rest):
            continue  # another model whose slug extends this one
        try:
            records = read_records(other)
        except MoeTuneError:
            continue  # a damaged sibling is not this sweep's problem
        header = records[0] if records else {}
        if header.get("type") == "header" and dict(header.get("settings", {}), split=None) == base:
            found.extend(records[1:])
    return found
