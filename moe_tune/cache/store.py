"""The locked cache store: many writers lose nothing, readers never see a half-written file.

Data flow of ``CacheStore(directory).write(cache_file)``:

1. ``path = directory / paths.file_name(device, triton)``; take the filelock ``<path>.lock``
   (an OS ``flock``: released by the kernel when its holder dies, so a killed writer never
   leaves the store locked);
2. delete temp files of writers that died mid-write (only a lock holder creates them, so any
   found while holding the lock are dead);
3. re-read the file under the lock — another process may have written since this one started —
   and merge the new entries into it (``schema.CacheFile.merge``: the merge rule);
4. write the result to a temp file in the same directory, fsync it, ``os.replace`` it over the
   file, fsync the directory.

Readers (``read_cache_file``, hence the runtime) take no lock: ``os.replace`` is atomic, so they see
the old file or the new one. A process killed mid-write leaves the old file intact plus a stray
temp file that the next writer removes. An existing file that cannot be parsed is renamed aside
to ``<name>.corrupt-<time>`` (kept for inspection, never read again) with a ``CacheWarning``; one
from a newer moe-tune major version is never overwritten (``CacheVersionError``).

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
import tempfile
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from moe_tune.cache import paths
from moe_tune.cache.schema import PACK_KIND, CacheFile, MergeStats, load_any
from moe_tune.device import DeviceInfo
from moe_tune.errors import CacheError, CacheVersionError, CacheWarning

# Test hook: called with the temp file's path after it is written and fsynced, before it replaces
# the cache file, while the lock is held (tests pause or kill the writer here).
before_replace_hook: Callable[[Path], None] | None = None

# Holding the lock takes milliseconds (re-read, merge, write a few hundred KiB); a minute means a
# writer is stuck on a hung file system, and failing loudly beats hanging a sweep forever.
DEFAULT_LOCK_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class WriteResult:
    path: Path
    stats: MergeStats


def read_cache_file(source: Any) -> CacheFile:
    """Parse one cache file (a ``Path`` or an ``importlib.resources`` Traversable), no lock."""
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise CacheError(f"{source}: cannot read ({exc.strerror or exc})") from None
    return CacheFile.loads(data, str(source))


def read_inputs(path: str | os.PathLike) -> list[tuple[str, CacheFile]]:
    """What a command-line input holds, as (origin, cache file) pairs: a directory's cache files,
    a cache file, or a pack's caches (checksum verified). A missing path is a ``CacheError``."""
    path = Path(path)
    if path.is_dir():
        return [(str(f), read_cache_file(f)) for f in paths.Layer("input", path).cache_files()]
    if not path.exists():
        raise CacheError(f"{path}: no such file or directory")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CacheError(f"{path}: cannot read ({exc.strerror or exc})") from None
    kind, caches = load_any(data, str(path))
    if kind == PACK_KIND:
        return [(f"{path}[{c.name}]", c) for c in caches]
    return [(str(path), c) for c in caches]


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a reader sees the old content or the new, never a mix.
    Callers that can race other writers must hold the file's lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp_path = Path(tmp)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates 0600; a cluster's shared cache dir needs the file readable by others.
        os.chmod(tmp_path, 0o644)
        if before_replace_hook is not None:
            before_replace_hook(tmp_path)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


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
        self.directory = paths.default_store_dir(directory)
        self.lock_timeout = lock_timeout

    def __repr__(self) -> str:
        return f"CacheStore({str(self.directory)!r})"

    def path_for(self, device: DeviceInfo | str, triton: str) -> Path:
        name = device.name if isinstance(device, DeviceInfo) else device
        return self.directory / paths.file_name(name, triton)

    def files(self) -> list[Path]:
        return paths.Layer("store", self.directory).cache_files()

    def read(self, device: DeviceInfo | str, triton: str) -> CacheFile | None:
        path = self.path_for(device, triton)
        return read_cache_file(path) if path.exists() else None

    def read_all(self) -> list[CacheFile]:
        return [read_cache_file(p) for p in self.files()]

    def write(self, cache: CacheFile) -> WriteResult:
        """Merge ``cache`` into its file under the lock and replace the file atomically."""
        if not isinstance(cache, CacheFile):
            raise CacheError(f"expected a CacheFile, got {type(cache).__name__}")
        path = self.directory / cache.name
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheError(f"{path.parent}: cannot create the cache directory ({exc.strerror or exc})") from None
        with self._locked(path):
            _remove_dead_temps(path)
            current = self._read_for_merge(path)
            if current is None:
                merged, stats = cache, MergeStats(added=len(cache))
            else:
                merged, stats = current, current.merge(cache)
            try:
                atomic_write_text(path, merged.dumps())
            except OSError as exc:
                raise CacheError(f"{path}: cannot write ({exc.strerror or exc})") from None
        return WriteResult(path, stats)

    def _locked(self, path: Path):
        # filelock costs ~24 ms to import; only writers pay it (the runtime reads without a lock).
        import filelock

        lock = filelock.FileLock(f"{path}.lock", timeout=self.lock_timeout)
        try:
            # acquire() returns a context manager that releases the lock on exit.
            return lock.acquire()
        except filelock.Timeout:
            raise CacheError(f"{path}: another writer held the lock for more than {self.lock_timeout:g} s") from None
        except OSError as exc:
            raise CacheError(f"{path}.lock: cannot lock ({exc.strerror or exc})") from None

    def _read_for_merge(self, path: Path) -> CacheFile | None:
        if not path.exists():
            return None
        try:
            return read_cache_file(path)
        except CacheVersionError:
            raise
        except CacheError as exc:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
            aside = path.with_name(f"{path.name}.corrupt-{stamp}")
            os.replace(path, aside)
            warnings.warn(f"moe-tune: {exc}; moved it to {aside.name} and started a fresh file",
                          CacheWarning, stacklevel=3)
            return None


def _remove_dead_temps(path: Path) -> None:
    for stray in path.parent.glob(f".{path.name}.*.tmp"):
        stray.unlink(missing_ok=True)
