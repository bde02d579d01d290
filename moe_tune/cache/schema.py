"""The cache file format: one place, one version number, the range of every value it holds.

Data flow: the sweep builds a ``CacheFile`` in memory (``add`` one measured config per problem and
token bucket) → ``to_json`` gives a plain dict with a stable key order → ``dumps`` indents it for
disk (``CacheStore`` in ``store.py`` does the locking and the atomic replace). Readers go back with
``CacheFile.loads`` (``fields.loads``: size, nesting and finite numbers) and ``from_json``, which
validate every field, type and range, and raise ``CacheError`` naming the field's place
(``entries['dw/…'].buckets[2].measurement.median_ms: …``); a file from a newer major version
raises ``CacheVersionError``; an older major is upgraded by ``_MIGRATIONS`` first. Writers are held
to the same ranges (``new``, ``add``, ``Measurement``), so nothing written is refused when read.

A cache file (one device, one Triton version; ``paths.file_name`` names it)::

    {
      "schema_version": "3.0",
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

Packs (several cache files bundled for shipping) live in ``pack.py``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Mapping

from moe_tune._version import __version__
from moe_tune.cache.paths import file_name
from moe_tune.cache.fields import MAX_NAME_CHARS, MAX_TEXT_CHARS, Fields, loads, parse_time, show
from moe_tune.cache.software import Software
from moe_tune.device import DeviceInfo
from moe_tune.errors import CacheError, CacheVersionError, InvalidInputError
from moe_tune.problem import KernelConfig, Problem

SCHEMA_VERSION = "3.0"
CACHE_KIND = "moe-tune-cache"
PACK_KIND = "moe-tune-pack"

# Provenance keeps the latest writes only: a sweep writes after every problem, and the file
# should stay readable after months of incremental sweeps.
MAX_WRITE_RECORDS = 32


def _from_v1(doc: dict) -> dict:
    """1.x → 2.0: configs gained ``WARP_SPEC``. A 1.x config ran without it, as one that reads
    ``WARP_SPEC: false`` does (the same machine code), so the entries carry over unchanged."""
    return {**doc, "schema_version": "2.0"}


def _from_v2(doc: dict) -> dict:
    """2.x → 3.0: configs gained ``PROGRAMS_PER_SM``. A 2.x config ran one program per SM, as one
    that reads ``PROGRAMS_PER_SM: 1`` does, so the entries carry over unchanged."""
    return {**doc, "schema_version": "3.0"}


# Upgrades from one major version to the next: _MIGRATIONS[n] turns a major-n document into a
# major-(n+1) one. 2.0 added the config key WARP_SPEC, 3.0 the key PROGRAMS_PER_SM (an older
# moe-tune cannot read either).
_MIGRATIONS: dict[int, Callable[[dict], dict]] = {1: _from_v1, 2: _from_v2}


def now_iso() -> str:
    """UTC timestamp with microseconds (later-wins merges compare these)."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _sig(value: float) -> float:
    # Six significant digits: timings are not more precise than that, and the file stays readable.
    return float(f"{value:.6g}")


# -------------------------------------------------------------------------------------------------
# Limits: the range of every number a file may hold (refused on read, and on write)
# -------------------------------------------------------------------------------------------------

# What one launch of the kernels accepts. Blocks: tl.dot needs 16 rows and columns at least, and
# 1024 keeps every 2-D tile within Triton's 2^20-element tensor limit. GROUP_M: the kernels multiply
# it by the count of column blocks in 32-bit arithmetic (1024 · 2^20/16 stays far inside). Warps: a
# CUDA block holds at most 1024 threads. Stages: each holds one buffer per operand in shared memory;
# the full space stops at 6, and 16 leaves room.
CONFIG_LIMITS: dict[str, tuple[int, int]] = {
    "BLOCK_M": (16, 1024), "BLOCK_N": (16, 1024), "BLOCK_K": (16, 1024),
    "GROUP_M": (1, 1024), "num_warps": (1, 32), "num_stages": (1, 16),
}

# Far above any model (the presets reach E = 512, N and K = 14336, k = 10) and low enough that
# E·N·K stays exact in the kernels' 64-bit offsets.
PROBLEM_LIMITS: dict[str, tuple[int, int]] = {"E": (1, 1 << 16), "N": (1, 1 << 20), "K": (1, 1 << 20),
                                              "topk": (1, 1 << 10)}

# Routed rows (tokens · k) are int32 in the routing metadata.
MAX_TOKENS = (1 << 31) - 1

# Generous for any GPU (an H200 is compute capability 9.0 with 132 SMs and 232448 bytes).
MAX_CAPABILITY = 99
MAX_SM_COUNT = 1 << 16
MAX_SHARED_MEM = 1 << 30

# A launch slower than ~3 hours or faster than 1 EFLOP/s is not a measurement.
MAX_MS = 1e7
MAX_TFLOPS = 1e6
MAX_SWEEP_SECONDS = 1e9
MAX_CANDIDATES = (1 << 31) - 1


def _outside(limits: Mapping[str, tuple[int, int]], value: Any) -> str | None:
    for name, (low, high) in limits.items():
        number = getattr(value, name)
        if not low <= number <= high:
            return f"{name} must be in [{low}, {high}], got {show(number)}"
    return None


def config_out_of_range(config: KernelConfig) -> str | None:
    """Why ``config`` is outside what a launch accepts (``CONFIG_LIMITS``), or None."""
    return _outside(CONFIG_LIMITS, config)


def problem_out_of_range(problem: Problem) -> str | None:
    """Why ``problem`` is outside ``PROBLEM_LIMITS`` (or has more experts per token than experts)."""
    reason = _outside(PROBLEM_LIMITS, problem)
    if reason is None and problem.topk > problem.E:
        reason = f"topk ({problem.topk}) exceeds the expert count ({problem.E})"
    return reason


def _device_out_of_range(device: DeviceInfo) -> str | None:
    major, minor = device.capability
    if not (isinstance(device.name, str) and device.name.isprintable() and 0 < len(device.name) <= MAX_NAME_CHARS):
        return f"the device name must be printable text of 1 to {MAX_NAME_CHARS} characters, got {show(device.name)}"
    if not (0 <= major <= MAX_CAPABILITY and 0 <= minor <= MAX_CAPABILITY):
        return f"capability must be two integers in [0, {MAX_CAPABILITY}], got {show(device.capability)}"
    if not 1 <= device.sm_count <= MAX_SM_COUNT:
        return f"sm_count must be in [1, {MAX_SM_COUNT}], got {show(device.sm_count)}"
    if not 1 <= device.max_shared_mem <= MAX_SHARED_MEM:
        return f"max_shared_mem must be in [1, {MAX_SHARED_MEM}], got {show(device.max_shared_mem)}"
    return None


def _device_from_json(f: Fields) -> DeviceInfo:
    capability = f.list("capability")
    if len(capability) != 2 or not all(type(v) is int and 0 <= v <= MAX_CAPABILITY for v in capability):
        raise f.fail("capability", f"expected two integers in [0, {MAX_CAPABILITY}], got {show(capability)}")
    name = f.name("name")
    if not name:
        raise f.fail("name", "empty")
    return DeviceInfo(name=name, capability=(capability[0], capability[1]),
                      sm_count=f.int("sm_count", 1, MAX_SM_COUNT),
                      max_shared_mem=f.int("max_shared_mem", 1, MAX_SHARED_MEM))


def _from_dict(where: str, build: Callable[[], Any],
               out_of_range: Callable[[Any], str | None] = lambda value: None) -> Any:
    """Run a ``from_dict`` (which raises ``InvalidInputError``), then the range check, and report
    either failure as a cache error at ``where``."""
    try:
        value = build()
    except (InvalidInputError, TypeError, ValueError) as exc:
        raise CacheError(f"{where}: {exc}") from None
    reason = out_of_range(value)
    if reason is not None:
        raise CacheError(f"{where}: {reason}")
    return value


def _software_text(software: Software) -> str | None:
    for name, value in software.to_dict().items():
        if value is None and name == "cuda":
            continue
        if not (isinstance(value, str) and value.isprintable() and len(value) <= MAX_NAME_CHARS):
            return f"software {name} must be printable text of at most {MAX_NAME_CHARS} characters, got {show(value)}"
    return None


def _clean_command(command: str) -> str:
    # argv may hold bytes that are not UTF-8 (lone surrogates in Python) and any length; the file
    # must encode as UTF-8 and stay within what readers accept.
    text = command.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= MAX_TEXT_CHARS else text[:MAX_TEXT_CHARS - 1] + "…"


# -------------------------------------------------------------------------------------------------
# Values
# -------------------------------------------------------------------------------------------------


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
        for name, maximum in _MEASUREMENT_MAXIMA.items():
            value = getattr(self, name)
            if value is None and name in ("default_ms", "max_rel_err"):
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= maximum:
                raise InvalidInputError(f"measurement {name} must be a number in [0, {maximum:g}], got {show(value)}")
            object.__setattr__(self, name, _sig(value))
        if not isinstance(self.candidates, int) or isinstance(self.candidates, bool) \
                or not 0 <= self.candidates <= MAX_CANDIDATES:
            raise InvalidInputError(f"measurement candidates must be an integer in [0, {MAX_CANDIDATES}], "
                                    f"got {show(self.candidates)}")
        if not isinstance(self.correct, bool):
            raise InvalidInputError(f"measurement correct must be true or false, got {show(self.correct)}")
        try:
            parse_time(self.measured_at)
        except ValueError as exc:
            raise InvalidInputError(f"measurement measured_at: {exc}") from None

    @property
    def speedup(self) -> float | None:
        """The heuristic default's time over the tuned config's (None when unknown)."""
        if self.default_ms is None or self.median_ms <= 0:
            return None
        ratio = self.default_ms / self.median_ms
        return ratio if ratio != float("inf") else None  # a median of 1e-320 ms overflows the ratio

    def to_dict(self) -> dict[str, Any]:
        return {"median_ms": self.median_ms, "spread_ms": self.spread_ms, "tflops": self.tflops,
                "default_ms": self.default_ms, "candidates": self.candidates, "correct": self.correct,
                "max_rel_err": self.max_rel_err, "measured_at": self.measured_at}

    @classmethod
    def from_json(cls, f: Fields) -> "Measurement":
        top = _MEASUREMENT_MAXIMA
        return cls(median_ms=f.float("median_ms", top["median_ms"]), spread_ms=f.float("spread_ms", top["spread_ms"]),
                   tflops=f.float("tflops", top["tflops"]),
                   default_ms=f.float("default_ms", top["default_ms"], optional=True),
                   candidates=f.int("candidates", 0, MAX_CANDIDATES), correct=f.bool("correct"),
                   max_rel_err=f.float("max_rel_err", top["max_rel_err"], optional=True),
                   measured_at=f.time("measured_at"))


_MEASUREMENT_MAXIMA = {"median_ms": MAX_MS, "tflops": MAX_TFLOPS, "default_ms": MAX_MS, "spread_ms": MAX_MS,
                       "max_rel_err": sys.float_info.max}


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
    newer = parse_time(incoming.measurement.measured_at) > parse_time(existing.measurement.measured_at)
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
    def from_json(cls, f: Fields) -> "WriteRecord":
        seconds = f.float("sweep_seconds", MAX_SWEEP_SECONDS, optional=True)
        return cls(time=f.time("time"), command=f.text("command"), sweep_seconds=seconds, moe_tune=f.name("moe_tune"))


@dataclass
class Provenance:
    created: str
    writes: list[WriteRecord] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"created": self.created, "writes": [w.to_dict() for w in self.writes]}

    def merge(self, other: "Provenance") -> None:
        self.created = min(self.created, other.created, key=parse_time)
        records = {(w.time, w.command): w for w in self.writes + other.writes}
        self.writes = sorted(records.values(), key=lambda w: parse_time(w.time))[-MAX_WRITE_RECORDS:]


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
        reason = _device_out_of_range(device) or _software_text(software)
        if reason is not None:
            raise InvalidInputError(reason)
        if command is None:
            argv = sys.argv if sys.argv and sys.argv[0] else ["python"]
            command = shlex.join([os.path.basename(argv[0]), *argv[1:]])
        seconds = None
        if sweep_seconds is not None:
            seconds = _sig(float(sweep_seconds))
            if not 0 <= seconds <= MAX_SWEEP_SECONDS:
                raise InvalidInputError(f"sweep_seconds must be in [0, {MAX_SWEEP_SECONDS:g}], got {show(sweep_seconds)}")
        time = now_iso()
        record = WriteRecord(time=time, command=_clean_command(command), sweep_seconds=seconds, moe_tune=__version__)
        return cls(device=device, software=software, provenance=Provenance(created=time, writes=[record]))

    # ---- identity ---------------------------------------------------------------------------

    @property
    def triton(self) -> str:
        return self.software.triton

    @property
    def name(self) -> str:
        """The file name this cache lives under (``paths.file_name``)."""
        return file_name(self.device.name, self.triton)

    @property
    def target(self) -> str:
        """What the file is for, in words: ``NVIDIA H100 80GB HBM3 (sm 9.0) / Triton 3.6.0``."""
        major, minor = self.device.capability
        return f"{self.device.name} (sm {major}.{minor}) / Triton {self.triton}"

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
        if not isinstance(tokens, int) or isinstance(tokens, bool) or not 1 <= tokens <= MAX_TOKENS:
            raise InvalidInputError(f"a token bucket must be an integer in [1, {MAX_TOKENS}], got {show(tokens)}")
        if not isinstance(config, KernelConfig):
            raise InvalidInputError(f"config must be a KernelConfig, got {type(config).__name__}")
        if not isinstance(measurement, Measurement):
            raise InvalidInputError(f"measurement must be a Measurement, got {type(measurement).__name__}")
        software = software or self.software
        if software.triton != self.triton:
            raise InvalidInputError(
                f"a cache file holds one Triton version ({self.triton}); this entry was measured with {software.triton}")
        reason = problem_out_of_range(problem) or config_out_of_range(config) or _software_text(software)
        if reason is not None:
            raise InvalidInputError(reason)
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
            raise CacheError(f"cannot merge a cache for {other.target} into one for {self.target} "
                             f"({differences(self, other)}): one file holds one device and one Triton version")
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
        data = upgrade(data, source, CACHE_KIND)
        top = Fields(data, source)
        device = _device_from_json(top.obj("device"))
        software = Software.from_json(top.obj("software"))
        prov = top.obj("provenance")
        writes = [WriteRecord.from_json(Fields(w, f"{prov.where}.writes[{i}]")) for i, w in enumerate(prov.list("writes"))]
        cache = cls(device=device, software=software, provenance=Provenance(prov.time("created"), writes))
        entries = top.obj("entries")
        for key, raw in entries.data.items():
            where = f"{source}.entries[{show(key)}]"
            entry = Fields(raw, where)
            problem = _from_dict(f"{where}.problem", lambda: Problem.from_dict(entry.obj("problem").data),
                                 problem_out_of_range)
            if problem.key != key:
                raise CacheError(f"{where}: the key does not match its problem ({problem.key})")
            buckets: dict[int, BucketEntry] = {}
            for i, raw_bucket in enumerate(entry.list("buckets")):
                b = Fields(raw_bucket, f"{where}.buckets[{i}]")
                tokens = b.int("tokens", 1, MAX_TOKENS)
                if tokens in buckets:
                    raise CacheError(f"{b.where}: token bucket {tokens} appears twice")
                config = _from_dict(f"{b.where}.config", lambda: KernelConfig.from_dict(b.obj("config").data),
                                    config_out_of_range)
                measurement = _from_dict(f"{b.where}.measurement", lambda: Measurement.from_json(b.obj("measurement")))
                bucket_software = Software.from_json(b.obj("software"))
                if bucket_software.triton != software.triton:
                    raise CacheError(f"{b.where}.software.triton: {show(bucket_software.triton)} in a file for "
                                     f"Triton {show(software.triton)} (one file holds one Triton version)")
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


_VERSION = re.compile(r"(\d{1,4})\.(\d{1,4})", re.ASCII)


def _parse_version(value: Any, source: str) -> tuple[int, int]:
    match = _VERSION.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise CacheError(f"{source}: schema_version must look like \"1.0\", got {show(value)}")
    return int(match.group(1)), int(match.group(2))


def upgrade(data: Any, source: str, kind: str) -> Any:
    """Check kind and version; bring an older major up to the current one."""
    top = Fields(data, source)
    if "schema_version" not in data:
        raise CacheError(f"{source}: not a moe-tune cache (no schema_version)")
    major, minor = _parse_version(data["schema_version"], source)
    found_kind = data.get("kind")
    if found_kind != kind:
        what = {CACHE_KIND: "a cache file", PACK_KIND: "a pack"}
        raise CacheError(f"{source}: expected {what[kind]}, found kind {show(found_kind)}"
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
        top = Fields(data, source)
    return data


def differences(a: CacheFile, b: CacheFile) -> str:
    """What tells two caches' targets apart, in words (name, compute capability, Triton version)."""
    found = []
    if a.device.name != b.device.name:
        found.append(f"device name {show(a.device.name)} vs {show(b.device.name)}")
    if a.device.capability != b.device.capability:
        found.append("compute capability {}.{} vs {}.{}".format(*a.device.capability, *b.device.capability))
    if a.triton != b.triton:
        found.append(f"Triton {show(a.triton)} vs {show(b.triton)}")
    return ", ".join(found) or "nothing"


def merge_all(caches: Iterable[CacheFile]) -> tuple[list[CacheFile], MergeStats]:
    """Group cache files by target (device, Triton version) and merge each group, in order."""
    merged: dict[str, CacheFile] = {}
    stats = MergeStats()
    for cache in caches:
        if cache.name in merged and merged[cache.name].same_target(cache):
            stats = stats + merged[cache.name].merge(cache)
        elif cache.name in merged:
            first = merged[cache.name]
            raise CacheError(f"two caches map to the file name {cache.name} but differ in "
                             f"{differences(first, cache)}: {first.target} and {cache.target} cannot share "
                             "one file; merge them separately")
        else:
            copy = CacheFile.from_json(cache.to_json(), cache.name)
            merged[cache.name] = copy
            stats = stats + MergeStats(added=len(copy))
    return [merged[n] for n in sorted(merged)], stats
