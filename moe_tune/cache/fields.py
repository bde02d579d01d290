"""Reading untrusted JSON: text → bounded plain values → typed fields, every failure a ``CacheError``.

Cache files and packs arrive from other machines, shared directories and e-mail, so every reader
treats them as hostile. Data flow:

1. ``loads``: the bytes (``store.read_bytes`` already refused non-regular files and capped the
   size at ``MAX_FILE_BYTES``) → UTF-8 text → nesting (at most ``MAX_DEPTH`` deep) and counts of
   containers and strings checked *before* the recursive JSON parser runs → dicts, lists, strings
   and numbers, where every float is finite and no integer is longer than ``_MAX_DIGITS`` digits;
2. ``Fields`` walks one JSON object: each key is taken with its type and its range (the limits
   below, one per kind of field) and any error names the key's place, on one line
   (``cache.entries['dw/…'].buckets[2].measurement.median_ms: …``);
3. ``parse_time``: a timestamp is ISO 8601 with a time zone, read to an aware UTC ``datetime``.

Whatever passes can be compared, divided, formatted, printed to a terminal and written back as
UTF-8 without an exception, so the runtime, ``show`` and every merge need no checks of their own.
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime, timedelta, timezone
from typing import Any, Mapping

from moe_tune.errors import CacheError

# A cache file holding every preset, dtype and token bucket of one GPU is about 2 MB (1 KB per
# bucket, as in the shipped caches); 16 MiB takes a pack of seven such GPUs. A hostile file at the
# cap costs up to ~5 s of one CPU core to read or refuse; a larger one is refused unread.
MAX_FILE_BYTES = 16 << 20

# A pack nests 8 containers deep (pack → caches → cache → entries → entry → buckets → bucket →
# config); 16 leaves room for metadata a minor version may add. Bounding it before parsing keeps
# a file of 100,000 '[' from reaching the recursive parser (a RecursionError, or a C stack overflow
# in a process that raised its recursion limit).
MAX_DEPTH = 16

# A bucket takes 4 objects (itself, config, measurement, software) and a problem 3, so 16 MiB of
# real caches hold under 80,000; the parser takes ~3 s per million containers (the garbage
# collector walks them), so a file of nothing but `[],` is refused before it is parsed.
MAX_CONTAINERS = 1 << 17
# About 40 strings per bucket, keys included: 16 MiB of real caches hold under a million.
MAX_STRINGS = 1 << 21

# 19 digits hold every int64; no field needs more, and int() of a 100,000-digit literal is slow.
_MAX_DIGITS = 19

# Names, versions and hashes are short; a sweep's command line is the longest text a file holds.
MAX_NAME_CHARS = 256
MAX_TEXT_CHARS = 4096

# Values echoed in error messages are cut to this many characters, so a message stays one line.
_SHOWN_CHARS = 60


def show(value: Any) -> str:
    """``repr`` of a value read from a file, cut short for a one-line message."""
    if isinstance(value, (dict, list)):
        return _type_name(value)
    text = repr(value[:_SHOWN_CHARS] if isinstance(value, str) else value)
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS - 1] + "…"


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


# -------------------------------------------------------------------------------------------------
# Text → plain values
# -------------------------------------------------------------------------------------------------

# The shape check reads bytes (UTF-8 never puts an ASCII byte inside a multi-byte character):
# escaped backslashes and quotes go first, then every byte but quotes and brackets, so that every
# quote left delimits a string and the brackets between quote pairs are text.
_KEEP = b'"[]{}'
_DROP = bytes(b for b in range(256) if b not in _KEEP)
_ONE_KIND = bytes.maketrans(b"{}", b"[]")
_TOO_DEEP = b"[" * (MAX_DEPTH + 1)


def _check_shape(data: bytes, source: str) -> None:
    """Refuse, without recursion, JSON holding more than ``MAX_CONTAINERS`` objects and lists or
    ``MAX_STRINGS`` strings, or containers nested deeper than ``MAX_DEPTH``. For the depth, each pass deletes every adjacent ``[]`` (the innermost level
    of every container), so a document ``MAX_DEPTH`` deep is gone after ``MAX_DEPTH`` passes;
    unbalanced text (not JSON) is left for the parser to report once its runs of openers are known
    to be short. Costs about what the parse itself costs."""
    specials = data.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _DROP)
    if specials.count(b'"') > 2 * MAX_STRINGS:
        raise CacheError(f"{source}: more than {MAX_STRINGS} JSON strings, not a moe-tune cache")
    outside = b"".join(specials.split(b'"')[::2])
    if outside.count(b"[") + outside.count(b"{") > MAX_CONTAINERS:
        raise CacheError(f"{source}: more than {MAX_CONTAINERS} JSON objects and lists, not a moe-tune cache")
    brackets = outside.translate(_ONE_KIND)
    for _ in range(MAX_DEPTH):
        if not brackets or _TOO_DEEP in brackets:
            break
        shorter = brackets.replace(b"[]", b"")
        if len(shorter) == len(brackets):
            break
        brackets = shorter
    if _TOO_DEEP in brackets or b"[]" in brackets:
        raise CacheError(f"{source}: JSON nested more than {MAX_DEPTH} levels deep, not a moe-tune cache")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {show(text)} is out of range")
    return value


def _short_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_DIGITS:
        raise ValueError(f"the integer {show(text)} is out of range")
    return int(text)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in a cache file")


def loads(text: str | bytes, source: str) -> Any:
    """Parse a cache file's or a pack's text into plain values (see the module docstring)."""
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    if len(data) > MAX_FILE_BYTES:
        raise CacheError(f"{source}: larger than {MAX_FILE_BYTES >> 20} MiB, not a moe-tune cache")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CacheError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise CacheError(f"{source}: the file is empty")
    _check_shape(data, source)
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float, parse_int=_short_int)
    except json.JSONDecodeError as exc:
        raise CacheError(f"{source}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except ValueError as exc:  # _finite_float, _refuse_constant
        raise CacheError(f"{source}: {exc}") from None


# -------------------------------------------------------------------------------------------------
# Timestamps
# -------------------------------------------------------------------------------------------------

_TIME = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d{1,6}))?(Z|([+-])(\d\d):(\d\d))", re.ASCII)


def parse_time(text: Any) -> datetime:
    """An ISO-8601 timestamp with a time zone (``2026-11-27T13:00:00.000000Z`` or ``…+01:00``) →
    an aware datetime in UTC. Dates without a time and times without a zone are refused: merges
    compare timestamps from many machines, and a naive one cannot be compared with an aware one.
    Raises ``ValueError``."""
    match = _TIME.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"expected an ISO-8601 time with a time zone, got {show(text)}")
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    micro = int((match.group(7) or "0").ljust(6, "0"))
    zone = timezone.utc
    if match.group(8) != "Z":
        offset = timedelta(hours=int(match.group(10)), minutes=int(match.group(11)))
        zone = timezone(-offset if match.group(9) == "-" else offset)  # ValueError beyond ±24 h
    try:
        return datetime(year, month, day, hour, minute, second, micro, tzinfo=zone).astimezone(timezone.utc)
    except OverflowError:  # year 1 or 9999 shifted out of range by its offset
        raise ValueError(f"the time {show(text)} is out of range") from None


# -------------------------------------------------------------------------------------------------
# Field-by-field validation with the field's place in every message
# -------------------------------------------------------------------------------------------------


class Fields:
    """One JSON object read key by key. ``where`` is its place in the file, for messages."""

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

    def name(self, key: str, optional: bool = False) -> str | None:
        """A name, version or hash: printable (it reaches terminals and one-line messages), short."""
        value = self.text(key, optional, limit=MAX_NAME_CHARS)
        if value is not None and not value.isprintable():
            raise self.fail(key, f"expected printable text, got {show(value)}")
        return value

    def text(self, key: str, optional: bool = False, limit: int = MAX_TEXT_CHARS) -> str | None:
        """Free text: any characters that encode as UTF-8 (no lone surrogates), at most ``limit``."""
        value = self._get(key, optional)
        if value is None and optional:
            return None
        if not isinstance(value, str):
            raise self.fail(key, f"expected a string, got {_type_name(value)}")
        if len(value) > limit:
            raise self.fail(key, f"longer than {limit} characters")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise self.fail(key, f"not valid Unicode text: {show(value)}") from None
        return value

    def int(self, key: str, minimum: int, maximum: int) -> int:
        value = self._get(key, False)
        if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= maximum:
            raise self.fail(key, f"expected an integer in [{minimum}, {maximum}], got {show(value)}")
        return value

    def float(self, key: str, maximum: float, optional: bool = False) -> float | None:
        value = self._get(key, optional)
        if value is None and optional:
            return None
        if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
                or not 0 <= value <= maximum):
            raise self.fail(key, f"expected a number in [0, {maximum:g}], got {show(value)}")
        return float(value)

    def bool(self, key: str) -> bool:
        value = self._get(key, False)
        if not isinstance(value, bool):
            raise self.fail(key, f"expected true or false, got {show(value)}")
        return value

    def time(self, key: str) -> str:
        """A timestamp (``parse_time``), kept as the text the file holds."""
        value = self._get(key, False)
        try:
            parse_time(value)
        except ValueError as exc:
            raise self.fail(key, str(exc)) from None
        return value

    def obj(self, key: str) -> "Fields":
        return Fields(self._get(key, False), f"{self.where}.{key}")

    def list(self, key: str) -> list:
        value = self._get(key, False)
        if not isinstance(value, list):
            raise self.fail(key, f"expected a list, got {_type_name(value)}")
        return value
