"""The cache file format and the pack format: one place, one version number.

Data flow: the sweep builds a ``CacheFile`` in memory (``add`` one measured config per problem and
token bucket) → ``to_json`` gives a plain dict with a stable key order → ``dumps`` indents it for
disk (``CacheStore`` in ``store.py`` does the locking and the atomic replace). Readers go back with
``loads``/``from_json``, which validate every field and raise ``CacheError`` naming the field's
place (``entries['dw/…'].buckets[2].measurement.median_ms: …``); a file from a newer major
version raises ``CacheVersionError``; an older major is upgraded by ``_MIGRATIONS`` first.

A cache file (one device, one Triton version; ``paths.file_name`` names it)::

    {
      "schema_version": "1.0",
      "kind": "moe-tune-cache",
      "device":     {"name", "capability": [9, 0], "sm_count", "max_shared_mem"},
      "software":   {"triton", "torch", "cuda", "moe_tune", "kernel_hash"},   # newest writer
      "provenance": {"created", "writes": [{"time", "command", "sweep_seconds", "moe_tune"}, …]},
      "entries": {
        "<Problem.key>": {
          "problem": {Problem.to_dict()},
          "buckets": [
            {"tokens": 4096,
             "config": {KernelConfig.to_dict()},
             "measurement": {"median_ms", "spread_ms", "tflops", "default_ms", "candidates",
                             "correct", "max_rel_err", "measured_at"},
             "software": {…the software this bucket was measured with…}},
            …  (sorted by tokens)
          ]
        }, …  (sorted by key)
      }
    }

Versioning: ``MAJOR.MINOR``. Minor versions only add optional metadata (readers ignore unknown
keys outside ``config`` and ``problem``); anything a reader must understand to pick a config bumps
the major. A reader refuses a newer major and upgrades an older one step by step.

Merge rule (``pick``) for one (problem, bucket) seen twice: an entry whose correctness gate
passed always beats one whose gate did not; between two measurements taken with the same
software (same device is guaranteed: a file holds one device) the faster median wins, ties keep
the existing one; across different software the later measurement wins, since timings from
different kernels or compilers are not comparable and the newer one describes what runs now.

A pack (``moe-tune export``) bundles cache files with a manifest and a sha256 over its canonical
JSON (sorted keys, no whitespace), so a copy damaged or edited in transit is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shlex
import sys
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Mapping

from moe_tune import __version__
from moe_tune.cache import paths
from moe_tune.device import DeviceInfo
from moe_tune.errors import CacheError, CacheVersionError, InvalidInputError
from moe_tune.problem import KernelConfig, Problem

SCHEMA_VERSION = "1.0"
CACHE_KIND = "moe-tune-cache"
PACK_KIND = "moe-tune-pack"

# Provenance keeps the latest writes only: a sweep writes after every problem, and the file
# should stay readable after months of incremental sweeps.
MAX_WRITE_RECORDS = 32

# Upgrades from one major version to the next: _MIGRATIONS[n] turns a major-n document into a
# major-(n+1) one. 1 is the first released major, so none exist yet.
_MIGRATIONS: dict[int, Callable[[dict], dict]] = {}


def now_iso() -> str:
    """UTC timestamp with microseconds (later-wins merges compare these)."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _sig(value: float) -> float:
    # Six significant digits: timings are not more precise than that, and the file stays readable.
    return float(f"{value:.6g}")


def _parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# -------------------------------------------------------------------------------------------------
# Field-by-field validation with the field's place in every message
# -------------------------------------------------------------------------------------------------


class _Fields:
    def __init__(self, data: Any, where: str):
        if not isinstance(data, Mapping):
            raise CacheError(f"{where}: expected an object, got {_type_name(data)}")
        self.data, self.where = data, where

    def _get(self, key: str, optional: bool) -> Any:
        if key not in self.data:
            if optional:
                return None
            raise CacheError(f"{self.where}: missing '{key}'")
        return self.data[key]

    def fail(self, key: str, message: str) -> CacheError:
        return CacheError(f"{self.where}.{key}: {message}")

    def str(self, key: str, optional: bool = False) -> str | None:
        value = self._get(key, optional)
        if value is None and optional:
            return None
        if not isinstance(value, str):
            raise self.fail(key, f"expected a string, got {_type_name(value)}")
        return value

    def int(self, key: str, minimum: int = 0) -> int:
        value = self._get(key, False)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise self.fail(key, f"expected an integer >= {minimum}, got {value!r}")
        return value

    def float(self, key: str, optional: bool = False) -> float | None:
        value = self._get(key, optional)
        if value is None and optional:
            return None
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise self.fail(key, f"expected a finite number >= 0, got {value!r}")
        return float(value)

    def bool(self, key: str) -> bool:
        value = self._get(key, False)
        if not isinstance(value, bool):
            raise self.fail(key, f"expected true or false, got {value!r}")
        return value

    def time(self, key: str) -> str:
        value = self.str(key)
        try:
            _parse_time(value)
        except ValueError:
            raise self.fail(key, f"expected an ISO-8601 time, got {value!r}") from None
        return value

    def obj(self, key: str) -> "_Fields":
        return _Fields(self._get(key, False), f"{self.where}.{key}")

    def list(self, key: str) -> list:
        value = self._get(key, False)
        if not isinstance(value, list):
            raise self.fail(key, f"expected a list, got {_type_name(value)}")
        return value


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def _wrap_invalid(where: str, build: Callable[[], Any]) -> Any:
    """Run a ``from_dict`` that raises ``InvalidInputError`` and report it as a cache error."""
    try:
        return build()
    except InvalidInputError as exc:
        raise CacheError(f"{where}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise CacheError(f"{where}: {exc}") from None


# -------------------------------------------------------------------------------------------------
# Values
# -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Software:
    """What a measurement depends on besides the device (see ``software.current_software``)."""

    triton: str
    torch: str
    cuda: str | None
    moe_tune: str
    kernel_hash: str

    def to_dict(self) -> dict[str, Any]:
        return {"triton": self.triton, "torch": self.torch, "cuda": self.cuda, "moe_tune": self.moe_tune,
                "kernel_hash": self.kernel_hash}

    @classmethod
    def from_json(cls, f: _Fields) -> "Software":
        return cls(triton=f.str("triton"), torch=f.str("torch"), cuda=f.str("cuda", optional=True),
                   moe_tune=f.str("moe_tune"), kernel_hash=f.str("kernel_hash"))


@dataclass(frozen=True)
class Measurement:
    """What the sweep measured for one config on one (problem, bucket).

    ``median_ms``: median launch time; ``spread_ms``: the width of the timing distribution as the
    tuner reports it (p80 − p20 of the repeats); ``tflops``: 2·M·N·K / median; ``default_ms``: the
    heuristic default's median on the same inputs (None when it could not run);
    ``candidates``: configs timed for this bucket; ``correct``: whether the correctness gate
    passed; ``max_rel_err``: its worst relative error (None when no gate ran).
    Floats are kept to six significant digits.
    """

    median_ms: float
    tflops: float
    default_ms: float | None
    candidates: int
    correct: bool
    spread_ms: float = 0.0
    max_rel_err: float | None = None
    measured_at: str = field(default_factory=now_iso)

    def __post_init__(self) -> None:
        for name in ("median_ms", "tflops", "default_ms", "spread_ms", "max_rel_err"):
            value = getattr(self, name)
            if value is None and name in ("default_ms", "max_rel_err"):
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise InvalidInputError(f"measurement {name} must be a finite number >= 0, got {value!r}")
            object.__setattr__(self, name, _sig(value))
        if not isinstance(self.candidates, int) or isinstance(self.candidates, bool) or self.candidates < 0:
            raise InvalidInputError(f"measurement candidates must be an integer >= 0, got {self.candidates!r}")
        if not isinstance(self.correct, bool):
            raise InvalidInputError(f"measurement correct must be true or false, got {self.correct!r}")
        try:
            _parse_time(self.measured_at)
        except (TypeError, ValueError, AttributeError):
            raise InvalidInputError(f"measurement measured_at must be an ISO-8601 time, got {self.measured_at!r}") from None

    @property
    def speedup(self) -> float | None:
        """The heuristic default's time over the tuned config's (None when unknown)."""
        if self.default_ms is None or self.median_ms <= 0:
            return None
        return self.default_ms / self.median_ms

    def to_dict(self) -> dict[str, Any]:
        return {"median_ms": self.median_ms, "spread_ms": self.spread_ms, "tflops": self.tflops,
                "default_ms": self.default_ms, "candidates": self.candidates, "correct": self.correct,
                "max_rel_err": self.max_rel_err, "measured_at": self.measured_at}

    @classmethod
    def from_json(cls, f: _Fields) -> "Measurement":
        return cls(median_ms=f.float("median_ms"), spread_ms=f.float("spread_ms"), tflops=f.float("tflops"),
                   default_ms=f.float("default_ms", optional=True), candidates=f.int("candidates"),
                   correct=f.bool("correct"), max_rel_err=f.float("max_rel_err", optional=True),
                   measured_at=f.time("measured_at"))


@dataclass(frozen=True)
class BucketEntry:
    """The cached value for one (problem, token bucket)."""

    config: KernelConfig
    measurement: Measurement
    software: Software

    def to_dict(self, tokens: int) -> dict[str, Any]:
        return {"tokens": tokens, "config": self.config.to_dict(), "measurement": self.measurement.to_dict(),
                "software": self.software.to_dict()}


def pick(existing: BucketEntry, incoming: BucketEntry) -> BucketEntry:
    """The merge rule (module docstring): gate first, then speed on equal software, else recency."""
    if existing.measurement.correct != incoming.measurement.correct:
        return existing if existing.measurement.correct else incoming
    if existing.software == incoming.software:
        return incoming if incoming.measurement.median_ms < existing.measurement.median_ms else existing
    newer = _parse_time(incoming.measurement.measured_at) > _parse_time(existing.measurement.measured_at)
    return incoming if newer else existing


@dataclass(frozen=True)
class WriteRecord:
    time: str
    command: str
    sweep_seconds: float | None
    moe_tune: str

    def to_dict(self) -> dict[str, Any]:
        return {"time": self.time, "command": self.command, "sweep_seconds": self.sweep_seconds,
                "moe_tune": self.moe_tune}

    @classmethod
    def from_json(cls, f: _Fields) -> "WriteRecord":
        seconds = f.float("sweep_seconds", optional=True)
        return cls(time=f.time("time"), command=f.str("command"), sweep_seconds=seconds, moe_tune=f.str("moe_tune"))


@dataclass
class Provenance:
    created: str
    writes: list[WriteRecord] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"created": self.created, "writes": [w.to_dict() for w in self.writes]}

    def merge(self, other: "Provenance") -> None:
        self.created = min(self.created, other.created, key=_parse_time)
        records = {(w.time, w.command): w for w in self.writes + other.writes}
        self.writes = sorted(records.values(), key=lambda w: _parse_time(w.time))[-MAX_WRITE_RECORDS:]


@dataclass(frozen=True)
class MergeStats:
    """What a merge did, counted in (problem, bucket) entries."""

    added: int = 0
    replaced: int = 0
    kept: int = 0

    def __add__(self, other: "MergeStats") -> "MergeStats":
        return MergeStats(self.added + other.added, self.replaced + other.replaced, self.kept + other.kept)

    def to_dict(self) -> dict[str, int]:
        return {"added": self.added, "replaced": self.replaced, "kept": self.kept}


# -------------------------------------------------------------------------------------------------
# The cache file
# -------------------------------------------------------------------------------------------------


@dataclass
class CacheFile:
    """Tuned configs of one device and one Triton version (one file on disk).

    Build with ``CacheFile.new(device)``, fill with ``add``, persist with ``CacheStore.write``.
    """

    device: DeviceInfo
    software: Software
    provenance: Provenance
    entries: dict[Problem, dict[int, BucketEntry]] = field(default_factory=dict)

    @classmethod
    def new(cls, device: DeviceInfo, software: Software | None = None, *, command: str | None = None,
            sweep_seconds: float | None = None) -> "CacheFile":
        """An empty file for ``device``; ``software`` defaults to the running process's,
        ``command`` to this process's command line."""
        if not isinstance(device, DeviceInfo):
            raise InvalidInputError(f"device must be a DeviceInfo, got {type(device).__name__}")
        if software is None:
            from moe_tune.cache.software import current_software

            software = current_software()
        if command is None:
            argv = sys.argv if sys.argv and sys.argv[0] else ["python"]
            command = shlex.join([os.path.basename(argv[0]), *argv[1:]])
        time = now_iso()
        seconds = None if sweep_seconds is None else _sig(float(sweep_seconds))
        record = WriteRecord(time=time, command=command, sweep_seconds=seconds, moe_tune=__version__)
        return cls(device=device, software=software, provenance=Provenance(created=time, writes=[record]))

    # ---- identity ---------------------------------------------------------------------------

    @property
    def triton(self) -> str:
        return self.software.triton

    @property
    def name(self) -> str:
        """The file name this cache lives under (``paths.file_name``)."""
        return paths.file_name(self.device.name, self.triton)

    def same_target(self, other: "CacheFile") -> bool:
        """Whether ``other`` belongs in the same file: same device (name and capability) and
        same Triton version."""
        return (self.device.name, self.device.capability, self.triton) == (
            other.device.name, other.device.capability, other.triton)

    # ---- content ----------------------------------------------------------------------------

    def add(self, problem: Problem, tokens: int, config: KernelConfig, measurement: Measurement,
            software: Software | None = None) -> BucketEntry:
        """Record one measured config; an existing entry for (problem, tokens) is kept or replaced
        by the merge rule. Returns the entry that stays."""
        if not isinstance(problem, Problem):
            raise InvalidInputError(f"problem must be a Problem, got {type(problem).__name__}")
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens <= 0:
            raise InvalidInputError(f"a token bucket must be a positive integer, got {tokens!r}")
        if not isinstance(config, KernelConfig):
            raise InvalidInputError(f"config must be a KernelConfig, got {type(config).__name__}")
        if not isinstance(measurement, Measurement):
            raise InvalidInputError(f"measurement must be a Measurement, got {type(measurement).__name__}")
        software = software or self.software
        if software.triton != self.triton:
            raise InvalidInputError(
                f"a cache file holds one Triton version ({self.triton}); this entry was measured with {software.triton}")
        entry = BucketEntry(config, measurement, software)
        buckets = self.entries.setdefault(problem, {})
        kept = pick(buckets[tokens], entry) if tokens in buckets else entry
        buckets[tokens] = kept
        return kept

    def get(self, problem: Problem, tokens: int) -> BucketEntry | None:
        return self.entries.get(problem, {}).get(tokens)

    def problems(self) -> list[Problem]:
        return sorted(self.entries, key=lambda p: p.key)

    def __len__(self) -> int:
        return sum(len(b) for b in self.entries.values())

    def select(self, keep: Callable[[Problem], bool]) -> "CacheFile":
        """A copy holding only the problems ``keep`` accepts."""
        return replace(self, entries={p: dict(b) for p, b in self.entries.items() if keep(p)},
                       provenance=Provenance(self.provenance.created, list(self.provenance.writes)))

    def merge(self, other: "CacheFile") -> MergeStats:
        """Fold ``other`` into this file, entry by entry, with the merge rule. The header's
        software becomes ``other``'s (the newer writer's)."""
        if not self.same_target(other):
            raise CacheError(
                f"cannot merge a cache for {other.device.name} / Triton {other.triton} into one for "
                f"{self.device.name} / Triton {self.triton}: one file holds one device and one Triton version")
        added = replaced = kept = 0
        for problem, buckets in other.entries.items():
            mine = self.entries.setdefault(problem, {})
            for tokens, entry in buckets.items():
                if tokens not in mine:
                    mine[tokens], added = entry, added + 1
                    continue
                winner = pick(mine[tokens], entry)
                if winner is mine[tokens] or winner == mine[tokens]:
                    kept += 1
                else:
                    mine[tokens], replaced = winner, replaced + 1
        self.software = other.software
        self.provenance.merge(other.provenance)
        return MergeStats(added, replaced, kept)

    # ---- JSON -------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        entries = {}
        for problem in self.problems():
            buckets = self.entries[problem]
            entries[problem.key] = {
                "problem": problem.to_dict(),
                "buckets": [buckets[t].to_dict(t) for t in sorted(buckets)],
            }
        return {
            "schema_version": SCHEMA_VERSION,
            "kind": CACHE_KIND,
            "device": self.device.to_dict(),
            "software": self.software.to_dict(),
            "provenance": self.provenance.to_dict(),
            "entries": entries,
        }

    def dumps(self) -> str:
        return dumps(self.to_json())

    @classmethod
    def from_json(cls, data: Any, source: str = "cache") -> "CacheFile":
        data = _upgrade(data, source, CACHE_KIND)
        top = _Fields(data, source)
        device = _wrap_invalid(f"{source}.device", lambda: DeviceInfo.from_dict(top.obj("device").data))
        software = Software.from_json(top.obj("software"))
        prov = top.obj("provenance")
        writes = [WriteRecord.from_json(_Fields(w, f"{prov.where}.writes[{i}]")) for i, w in enumerate(prov.list("writes"))]
        cache = cls(device=device, software=software, provenance=Provenance(prov.time("created"), writes))
        entries = top.obj("entries")
        for key, raw in entries.data.items():
            where = f"{source}.entries[{key!r}]"
            entry = _Fields(raw, where)
            problem = _wrap_invalid(f"{where}.problem", lambda: Problem.from_dict(entry.obj("problem").data))
            if problem.key != key:
                raise CacheError(f"{where}: the key does not match its problem ({problem.key})")
            buckets: dict[int, BucketEntry] = {}
            for i, raw_bucket in enumerate(entry.list("buckets")):
                b = _Fields(raw_bucket, f"{where}.buckets[{i}]")
                tokens = b.int("tokens", minimum=1)
                if tokens in buckets:
                    raise CacheError(f"{b.where}: token bucket {tokens} appears twice")
                config = _wrap_invalid(f"{b.where}.config", lambda: KernelConfig.from_dict(b.obj("config").data))
                measurement = _wrap_invalid(f"{b.where}.measurement",
                                            lambda: Measurement.from_json(b.obj("measurement")))
                bucket_software = Software.from_json(b.obj("software"))
                buckets[tokens] = BucketEntry(config, measurement, bucket_software)
            cache.entries[problem] = buckets
        return cache

    @classmethod
    def loads(cls, text: str | bytes, source: str = "cache") -> "CacheFile":
        return cls.from_json(loads(text, source), source)


# A list of plain numbers (the capability) printed by indent=2 takes one line per number.
_NUMBER_LIST = re.compile(r"\[\s+(-?[\d.eE+-]+(?:,\s+-?[\d.eE+-]+)*)\s+\]")


def dumps(doc: Mapping[str, Any]) -> str:
    """Disk form: indented, keys in the order the writer built them (stable), lists of numbers on
    one line, newline at the end."""
    text = json.dumps(doc, indent=2, ensure_ascii=False, allow_nan=False)
    return _NUMBER_LIST.sub(lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]", text) + "\n"


def loads(text: str | bytes, source: str) -> Any:
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CacheError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise CacheError(f"{source}: the file is empty")
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise CacheError(f"{source}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except ValueError as exc:
        raise CacheError(f"{source}: {exc}") from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in a cache file")


def _parse_version(value: Any, source: str) -> tuple[int, int]:
    if isinstance(value, str):
        parts = value.split(".")
        if len(parts) == 2 and all(p.isdigit() for p in parts):
            return int(parts[0]), int(parts[1])
    raise CacheError(f"{source}: schema_version must look like \"1.0\", got {value!r}")


def _upgrade(data: Any, source: str, kind: str) -> Any:
    """Check kind and version; bring an older major up to the current one."""
    top = _Fields(data, source)
    if "schema_version" not in data:
        raise CacheError(f"{source}: not a moe-tune cache (no schema_version)")
    major, minor = _parse_version(data["schema_version"], source)
    found_kind = data.get("kind")
    if found_kind != kind:
        what = {CACHE_KIND: "a cache file", PACK_KIND: "a pack"}
        raise CacheError(f"{source}: expected {what.get(kind, kind)}, found kind {found_kind!r}"
                         + (" (install a pack with `moe-tune install`)" if found_kind == PACK_KIND else ""))
    current = _parse_version(SCHEMA_VERSION, "SCHEMA_VERSION")[0]
    if major > current:
        raise CacheVersionError(
            f"{source}: written by a newer moe-tune (schema {major}.{minor}; this moe-tune {__version__} "
            f"reads {current}.x): upgrade moe-tune to use it")
    while major < current:
        migrate = _MIGRATIONS.get(major)
        if migrate is None:
            raise CacheVersionError(f"{source}: schema {major}.{minor} is too old to read (no migration to {major + 1}.x)")
        data = migrate(dict(top.data))
        major, minor = _parse_version(data.get("schema_version"), source)
        top = _Fields(data, source)
    return data


# -------------------------------------------------------------------------------------------------
# Packs
# -------------------------------------------------------------------------------------------------


def canonical_sha256(payload: Mapping[str, Any]) -> str:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


@dataclass
class Pack:
    """Cache files bundled for shipping: data only, names derived from content on install."""

    caches: list[CacheFile]
    created: str = field(default_factory=now_iso)
    command: str = ""
    model: str | None = None

    def to_json(self) -> dict[str, Any]:
        caches = sorted(self.caches, key=lambda c: c.name)
        manifest = {
            "created": self.created,
            "moe_tune": __version__,
            "command": self.command,
            "model": self.model,
            "files": [{"name": c.name, "device": c.device.name, "capability": list(c.device.capability),
                       "triton": c.triton, "problems": len(c.entries), "entries": len(c)} for c in caches],
        }
        payload = {"schema_version": SCHEMA_VERSION, "kind": PACK_KIND, "manifest": manifest,
                   "caches": [c.to_json() for c in caches]}
        return {**payload, "sha256": canonical_sha256(payload)}

    def dumps(self) -> str:
        return dumps(self.to_json())

    @classmethod
    def from_json(cls, data: Any, source: str = "pack") -> "Pack":
        data = _upgrade(data, source, PACK_KIND)
        top = _Fields(data, source)
        claimed = top.str("sha256")
        payload = {k: v for k, v in data.items() if k != "sha256"}
        try:
            actual = canonical_sha256(payload)
        except ValueError as exc:
            raise CacheError(f"{source}: {exc}") from None
        if claimed != actual:
            raise CacheError(f"{source}: checksum mismatch (manifest says {claimed[:12]}…, content is "
                             f"{actual[:12]}…): the pack was damaged or edited after export")
        manifest = top.obj("manifest")
        files = manifest.list("files")
        caches = [CacheFile.from_json(c, f"{source}.caches[{i}]") for i, c in enumerate(top.list("caches"))]
        if len(files) != len(caches):
            raise CacheError(f"{source}: the manifest lists {len(files)} files but the pack holds {len(caches)}")
        seen = set()
        for i, (listed, cache) in enumerate(zip(files, caches)):
            name = _Fields(listed, f"{manifest.where}.files[{i}]").str("name")
            # The name is never used as a path (install derives it from the content); a mismatch
            # means the manifest lies about what the pack holds.
            if name != cache.name:
                raise CacheError(f"{source}: manifest file {i} is named {name!r} but holds a cache for "
                                 f"{cache.device.name} / Triton {cache.triton} ({cache.name})")
            if cache.name in seen:
                raise CacheError(f"{source}: two caches for {cache.device.name} / Triton {cache.triton}")
            seen.add(cache.name)
        model = manifest.str("model", optional=True)
        return cls(caches=caches, created=manifest.time("created"), command=manifest.str("command"), model=model)

    @classmethod
    def loads(cls, text: str | bytes, source: str = "pack") -> "Pack":
        return cls.from_json(loads(text, source), source)


def load_any(text: str | bytes, source: str) -> tuple[str, list[CacheFile]]:
    """A cache file or a pack → (its kind, the cache files it holds), for commands taking either."""
    data = loads(text, source)
    kind = data.get("kind") if isinstance(data, Mapping) else None
    if kind == PACK_KIND:
        return PACK_KIND, Pack.from_json(data, source).caches
    return CACHE_KIND, [CacheFile.from_json(data, source)]


def merge_all(caches: Iterable[CacheFile]) -> tuple[list[CacheFile], MergeStats]:
    """Group cache files by target (device, Triton version) and merge each group, in order."""
    merged: dict[str, CacheFile] = {}
    stats = MergeStats()
    for cache in caches:
        if cache.name in merged and merged[cache.name].same_target(cache):
            stats = stats + merged[cache.name].merge(cache)
        elif cache.name in merged:
            raise CacheError(f"two different devices share the file name {cache.name}: "
                             f"{merged[cache.name].device.name} and {cache.device.name}")
        else:
            copy = CacheFile.from_json(cache.to_json(), cache.name)
            merged[cache.name] = copy
            stats = stats + MergeStats(added=len(copy))
    return [merged[n] for n in sorted(merged)], stats
