"""The locked store: many writers lose nothing, readers never see a half-written file, and no file
read, however hostile, crashes or blocks its reader.

Data flow of ``CacheStore(directory).write(cache_file)``:

1. ``path = directory / file_name(device, triton)``; take the filelock ``<path>.lock``
   (an OS ``flock``: released by the kernel when its holder dies, so a killed writer never
   leaves the store locked). A waiter gives up only when no writer has finished for
   ``lock_timeout`` seconds (the holder is stuck), never for queueing behind writers that make
   progress, however many (``_locked``);
2. delete temp files of writers that died mid-write (only a lock holder creates them, so any
   found while holding the lock are dead);
3. re-read the file under the lock — another process may have written since this one started —
   and merge the new entries into it (``schema.CacheFile.merge``: the merge rule);
4. stage the result in a temp file in the same directory (written, fsynced), then ``publish`` it:
   ``os.replace`` over the file and fsync the directory.

Readers (``read_cache_file``, ``read_inputs``, hence the runtime and every command) take no lock:
``os.replace`` is atomic, so they see the old file or the new one. ``read_bytes`` treats every
file as hostile: anything but a regular file (a FIFO, a device, a directory) is refused without
being opened, and nothing over ``fields.MAX_FILE_BYTES`` is read. A process killed mid-write leaves
the old file intact plus a stray temp file that the next writer removes. An existing file that
cannot be parsed is renamed aside to ``<name>.corrupt-<time>`` (kept for inspection, never read
again) with a ``CacheWarning``; one from a newer moe-tune major version is never overwritten
(``CacheVersionError``). ``preview`` answers what ``write`` would do, failing where it would fail.

Public API for writers (the sweep engine)::

    cache = CacheFile.new(device, command="moe-tune sweep …", sweep_seconds=…)
    cache.add(problem, tokens, config, Measurement(median_ms=…, tflops=…, default_ms=…,
                                                    candidates=…, correct=True, spread_ms=…,
                                                    max_rel_err=…))
    CacheStore(directory_or_None).write(cache)   # → WriteResult(path, stats); safe to repeat

Writing after every finished problem is cheap (a few ms for a whole model's file), so a crash
mid-sweep loses at most the problem in flight.
"""

from __future__ import annotations

import os
import random
import stat
import tempfile
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from moe_tune.cache.paths import Layer, default_store_dir, file_name
from moe_tune.cache.fields import MAX_FILE_BYTES
from moe_tune.cache.pack import load_any
from moe_tune.cache.schema import PACK_KIND, CacheFile, MergeStats
from moe_tune.device import DeviceInfo
from moe_tune.errors import CacheError, CacheVersionError, CacheWarning

# Holding the lock takes milliseconds for a model's file, about a second for 1,600 entries on a busy
# 2-core box (re-read, merge, write); a minute without any writer finishing means the holder is
# stuck on a hung file system, and failing loudly beats hanging a sweep forever.
DEFAULT_LOCK_TIMEOUT_S = 60.0

# Waiters retry the lock at random intervals, so that they do not retry in step and 31 of them
# still leave the holder its CPU. With 31 waiters the first retry after a release comes within about
# half a millisecond, about as soon as the writer that released it can come back for it.
_POLL_S = (0.005, 0.025)
# How often a waiter checks whether the writers ahead of it are making progress.
_PROGRESS_CHECK_S = 0.5


@dataclass(frozen=True)
class WriteResult:
    path: Path
    stats: MergeStats


# -------------------------------------------------------------------------------------------------
# Reading: every file is hostile
# -------------------------------------------------------------------------------------------------


def read_bytes(source: Any) -> bytes:
    """The bytes of a cache file or pack (a path, or an ``importlib.resources`` Traversable inside
    a zip). Anything but a regular file is refused before it is opened (opening a FIFO blocks until
    a writer appears), and no more than ``MAX_FILE_BYTES`` are read. Raises ``CacheError``."""
    if not isinstance(source, (str, os.PathLike)):
        # A member of a zipped wheel: regular by construction, its size known to the archive.
        try:
            data = source.read_bytes()
        except OSError as exc:
            raise CacheError(f"{source}: cannot read ({exc.strerror or exc})") from None
        return _capped(data, source)
    try:
        _require_regular(os.stat(source), source)
        # O_NONBLOCK: if a FIFO replaced the file since the stat, the open still returns at once.
        fd = os.open(source, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except (OSError, ValueError) as exc:
        raise CacheError(f"{source}: cannot read ({_reason(exc)})") from None
    try:
        _require_regular(os.fstat(fd), source)
        chunks, size = [], 0
        while size <= MAX_FILE_BYTES:
            chunk = os.read(fd, MAX_FILE_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise CacheError(f"{source}: cannot read ({_reason(exc)})") from None
    finally:
        os.close(fd)
    return _capped(b"".join(chunks), source)


def _require_regular(info: os.stat_result, source: Any) -> None:
    if not stat.S_ISREG(info.st_mode):
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        raise CacheError(f"{source}: {kind}, not a cache file or pack")
    if info.st_size > MAX_FILE_BYTES:
        raise CacheError(f"{source}: larger than {MAX_FILE_BYTES >> 20} MiB, not a moe-tune cache")


def _capped(data: bytes, source: Any) -> bytes:
    if len(data) > MAX_FILE_BYTES:
        raise CacheError(f"{source}: larger than {MAX_FILE_BYTES >> 20} MiB, not a moe-tune cache")
    return data


def _reason(exc: Exception) -> str:
    return (exc.strerror if isinstance(exc, OSError) else None) or str(exc)


def read_cache_file(source: Any) -> CacheFile:
    """Parse one cache file (a ``Path`` or an ``importlib.resources`` Traversable), no lock."""
    return CacheFile.loads(read_bytes(source), str(source))


def read_inputs(path: str | os.PathLike) -> list[tuple[str, CacheFile]]:
    """What a command-line input holds, as (origin, cache file) pairs: a directory's cache files,
    a cache file, or a pack's caches (checksum verified). A missing path is a ``CacheError``."""
    path = Path(path)
    try:
        is_dir = stat.S_ISDIR(path.stat().st_mode)
    except (FileNotFoundError, NotADirectoryError):
        raise CacheError(f"{path}: no such file or directory") from None
    except (OSError, ValueError) as exc:
        raise CacheError(f"{path}: cannot read ({_reason(exc)})") from None
    if is_dir:
        try:
            files = Layer("input", path).cache_files()
        except OSError as exc:
            raise CacheError(f"{path}: cannot list ({_reason(exc)})") from None
        return [(str(f), read_cache_file(f)) for f in files]
    kind, caches = load_any(read_bytes(path), str(path))
    if kind == PACK_KIND:
        return [(f"{path}[{c.name}]", c) for c in caches]
    return [(str(path), c) for c in caches]


# -------------------------------------------------------------------------------------------------
# Writing: stage, then publish
# -------------------------------------------------------------------------------------------------


def stage_text(path: Path, text: str) -> Path:
    """Write ``text`` to a new temp file beside ``path``, fsynced and readable by all: the content
    ``publish_file`` puts in place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    staged = Path(tmp)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates 0600; a cluster's shared cache dir needs the file readable by others.
        os.chmod(staged, 0o644)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    return staged


def publish_file(staged: Path, path: Path) -> None:
    """Replace ``path`` with the staged file atomically (readers see the old content or the new),
    and make the rename durable."""
    os.replace(staged, path)
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a reader sees the old content or the new, never a mix.
    Callers that can race other writers must hold the file's lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = stage_text(path, text)
    try:
        publish_file(staged, path)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; some file systems cannot open or sync a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class CacheStore:
    """One directory of cache files (``paths`` describes the layout).

    ``directory`` None means ``$MOE_TUNE_CACHE_DIR``, else the user cache dir.
    """

    def __init__(self, directory: str | os.PathLike | None = None, *,
                 lock_timeout: float = DEFAULT_LOCK_TIMEOUT_S):
        self.directory = default_store_dir(directory)
        self.lock_timeout = lock_timeout

    def __repr__(self) -> str:
        return f"CacheStore({str(self.directory)!r})"

    def path_for(self, device: DeviceInfo | str, triton: str) -> Path:
        name = device.name if isinstance(device, DeviceInfo) else device
        return self.directory / file_name(name, triton)

    def files(self) -> list[Path]:
        try:
            return Layer("store", self.directory).cache_files()
        except OSError as exc:
            raise CacheError(f"{self.directory}: cannot list ({_reason(exc)})") from None

    def read(self, device: DeviceInfo | str, triton: str) -> CacheFile | None:
        path = self.path_for(device, triton)
        return read_cache_file(path) if path.exists() else None

    def write(self, cache: CacheFile) -> WriteResult:
        """Merge ``cache`` into its file under the lock and replace the file atomically."""
        path = self._target(cache)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheError(f"{path.parent}: cannot create the cache directory ({_reason(exc)})") from None
        with self._locked(path):
            _remove_dead_temps(path)
            current = self._read_for_merge(path, move_aside=True)
            if current is None:
                merged, stats = cache, MergeStats(added=len(cache))
            else:
                merged, stats = current, current.merge(cache)
            try:
                staged = stage_text(path, merged.dumps())
                try:
                    self.publish(staged, path)
                except BaseException:
                    staged.unlink(missing_ok=True)
                    raise
            except OSError as exc:
                raise CacheError(f"{path}: cannot write ({_reason(exc)})") from None
        return WriteResult(path, stats)

    def preview(self, cache: CacheFile) -> WriteResult:
        """What ``write(cache)`` would do, writing nothing; a ``CacheError`` where it would fail
        (a directory that cannot be created or written, a file from a newer moe-tune, a cache for
        another device under the same file name)."""
        path = self._target(cache)
        reason = _unwritable(path)
        if reason is not None:
            raise CacheError(reason)
        current = self._read_for_merge(path, move_aside=False)
        stats = MergeStats(added=len(cache)) if current is None else current.merge(cache)
        return WriteResult(path, stats)

    def publish(self, staged: Path, path: Path) -> None:
        """Put the staged file (complete and fsynced) in place of ``path``, under the lock: the
        moment readers see the new content. A subclass may wrap it; the crash tests stop a writer
        here."""
        publish_file(staged, path)

    def _target(self, cache: CacheFile) -> Path:
        if not isinstance(cache, CacheFile):
            raise CacheError(f"expected a CacheFile, got {type(cache).__name__}")
        return self.directory / cache.name

    def _locked(self, path: Path):
        """Take ``<path>.lock``; returns a context manager that releases it. A waiter gives up only
        when the cache file has not changed for ``lock_timeout`` seconds: queueing behind 31 other
        writers is progress, a holder stuck on a hung file system is not."""
        # filelock costs ~24 ms to import; only writers pay it (the runtime reads without a lock).
        import filelock

        lock = filelock.FileLock(f"{path}.lock")
        last, since = _last_write(path), time.monotonic()
        while True:
            try:
                return lock.acquire(timeout=min(_PROGRESS_CHECK_S, self.lock_timeout),
                                    poll_interval=random.uniform(*_POLL_S))
            except filelock.Timeout:
                mark = _last_write(path)
                if mark != last:
                    last, since = mark, time.monotonic()
                elif time.monotonic() - since >= self.lock_timeout:
                    raise CacheError(f"{path}: waited {self.lock_timeout:g} s for the lock while no writer finished; "
                                     "the writer holding it is stuck") from None
            except OSError as exc:
                raise CacheError(f"{path}.lock: cannot lock ({_reason(exc)})") from None

    def _read_for_merge(self, path: Path, *, move_aside: bool) -> CacheFile | None:
        """The file to merge into, or None for a fresh one. One that cannot be parsed is moved
        aside (or, in a preview, would be); one from a newer moe-tune stops the write."""
        if not path.exists():
            return None
        try:
            return read_cache_file(path)
        except CacheVersionError:
            raise
        except CacheError as exc:
            if not move_aside:
                warnings.warn(f"moe-tune: {exc}; a write would move it aside and start a fresh file",
                              CacheWarning, stacklevel=3)
                return None
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
            aside = path.with_name(f"{path.name}.corrupt-{stamp}")
            try:
                os.replace(path, aside)
            except OSError as move:
                raise CacheError(f"{exc}; cannot move it aside ({_reason(move)})") from None
            warnings.warn(f"moe-tune: {exc}; moved it to {aside.name} and started a fresh file",
                          CacheWarning, stacklevel=3)
            return None


def _last_write(path: Path) -> tuple[int, int, int] | None:
    # Every write replaces the file with a new inode: a changed stat means a writer finished.
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_ino, info.st_mtime_ns, info.st_size


def _unwritable(path: Path) -> str | None:
    """Why ``write`` could not create ``path``'s directory, its lock or its temp file, or None."""
    existing = path.parent
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{path.parent}: cannot create the cache directory ({existing} is not a directory)"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{path.parent}: cannot write there (no permission in {existing})"
    lock = Path(f"{path}.lock")
    if os.path.lexists(lock) and not lock.is_file():
        return f"{lock}: cannot lock (not a regular file)"
    return None


def _remove_dead_temps(path: Path) -> None:
    for stray in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            stray.unlink(missing_ok=True)
        except OSError:  # not a file we made (a directory of that name): leave it
            continue
