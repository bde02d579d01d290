"""Where cache files live on disk, and the layers the runtime searches, in order.

Data flow: a (device, Triton version) pair → ``file_name`` → a path inside one cache directory
(``CacheStore`` writes there). Readers (``moe_tune.runtime``, ``moe-tune show``) walk
``search_layers()``:

1. ``explicit`` — a path handed to ``moe_tune.runtime.set_cache_dir`` or a CLI ``--cache-dir``,
   else ``env`` — ``$MOE_TUNE_CACHE_DIR``;
2. ``user`` — platformdirs' user cache dir for the app ``moe-tune``
   (``~/.cache/moe-tune`` on Linux, honouring ``$XDG_CACHE_HOME``);
3. ``shipped`` — the resource package ``moe_tune.shipped_caches`` (the repository's ``caches/``
   folder, inside the wheel), read through ``importlib.resources``.

Layout: flat, one JSON file per (device, Triton version)::

    <dir>/<device-slug>__triton-<version-slug>.json    the cache file
    <dir>/<device-slug>__triton-<version-slug>.json.lock   the writers' filelock (kept on purpose:
                                                            deleting a lock file races other writers)

Flat because the shipped caches travel as package data matched by ``*.json`` one level deep, and
because one file never mixes devices or Triton versions, so a cluster can copy exactly the file
its GPUs need. Both slugs keep only ``[a-z0-9.-]`` (no separators, no ``..``): a name read from a
pack can never point outside the directory it is written into.

Test and embedding hook: ``override_roots(user=..., shipped=...)`` replaces the user and shipped
locations (a directory that does not exist is an empty layer). Nothing here caches results, but
the runtime memoises what it read: call ``moe_tune.runtime.reset()`` after changing a root or an
environment variable.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from moe_tune.slug import slug

APP_NAME = "moe-tune"
ENV_CACHE_DIR = "MOE_TUNE_CACHE_DIR"
SHIPPED_PACKAGE = "moe_tune.shipped_caches"
SEPARATOR = "__triton-"
SUFFIX = ".json"

_UNSET: Any = object()
_overrides: dict[str, Path] = {}


def device_slug(name: str) -> str:
    """File-name-safe device name: ``NVIDIA H100 80GB HBM3`` → ``nvidia-h100-80gb-hbm3``."""
    return slug(name, fallback="unknown-device")


def version_slug(version: str) -> str:
    """File-name-safe version: ``3.6.0+git1a2b`` → ``3.6.0-git1a2b``."""
    return slug(version, dots=True, fallback="unknown")


def file_name(device_name: str, triton_version: str) -> str:
    return f"{device_slug(device_name)}{SEPARATOR}{version_slug(triton_version)}{SUFFIX}"


def is_cache_file_name(name: str) -> bool:
    """Whether ``name`` looks like a cache file (lock files, temp files and strays do not)."""
    return name.endswith(SUFFIX) and SEPARATOR in name and not name.startswith(".")


def user_cache_dir() -> Path:
    if "user" in _overrides:
        return _overrides["user"]
    # platformdirs costs ~4 ms to import; only a resolution (a memo miss) gets here.
    try:
        import platformdirs
    except ImportError:
        # A declared dependency, but images built with --no-deps lack it (the GPU boxes this was
        # measured on did): a missing helper must not stop training from finding its caches.
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return Path(base) / APP_NAME
    return Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False))


def shipped_root() -> Any:
    """The shipped caches as a ``Traversable`` (a ``Path`` in normal installs), or None when the
    resource package is missing (a broken install must not stop training)."""
    if "shipped" in _overrides:
        return _overrides["shipped"]
    import importlib.resources

    try:
        return importlib.resources.files(SHIPPED_PACKAGE)
    except ModuleNotFoundError:
        # A source checkout on PYTHONPATH, not installed (how GPU boxes often run it): the
        # resource package is the repository's caches/ folder, beside the moe_tune package.
        checkout = Path(__file__).resolve().parents[2] / "caches"
        return checkout if (checkout / "__init__.py").is_file() else None


def default_store_dir(explicit: str | os.PathLike | None = None) -> Path:
    """Where writers put caches: the explicit directory, else ``$MOE_TUNE_CACHE_DIR``, else the
    user cache dir. (The shipped layer is read-only.)"""
    if explicit is not None:
        return Path(explicit)
    env = os.environ.get(ENV_CACHE_DIR)
    if env:
        return Path(env)
    return user_cache_dir()


@contextlib.contextmanager
def override_roots(*, user: str | os.PathLike = _UNSET, shipped: str | os.PathLike = _UNSET) -> Iterator[None]:
    """Point the user and/or shipped layer somewhere else for the duration of the block."""
    saved = dict(_overrides)
    if user is not _UNSET:
        _overrides["user"] = Path(user)
    if shipped is not _UNSET:
        _overrides["shipped"] = Path(shipped)
    try:
        yield
    finally:
        _overrides.clear()
        _overrides.update(saved)


@dataclass(frozen=True)
class Layer:
    """One place the readers look. ``root`` is a directory or a single cache file, as a ``Path``
    or an ``importlib.resources`` Traversable."""

    name: str  # "explicit" | "env" | "user" | "shipped"
    root: Any

    def __str__(self) -> str:
        return f"{self.name} ({self.root})"

    def cache_files(self, device_name: str | None = None) -> list[Any]:
        """The layer's cache files, sorted by name; only ``device_name``'s when given. A missing
        root is an empty layer; an unreadable one raises ``OSError`` for the caller to report.
        Only regular files count: a FIFO or a directory named like a cache file is skipped
        (``is_file`` stats it; opening a FIFO would block)."""
        root = self.root
        if root is None:
            return []
        if root.is_file():
            return [root]
        if not root.is_dir():
            return []
        prefix = device_slug(device_name) + SEPARATOR if device_name is not None else ""
        found = [f for f in root.iterdir() if is_cache_file_name(f.name) and f.name.startswith(prefix) and f.is_file()]
        return sorted(found, key=lambda f: f.name)


def search_layers(explicit: str | os.PathLike | None = None) -> list[Layer]:
    """The read layers in resolution order (see the module docstring)."""
    layers = []
    if explicit is not None:
        layers.append(Layer("explicit", Path(explicit)))
    elif os.environ.get(ENV_CACHE_DIR):
        layers.append(Layer("env", Path(os.environ[ENV_CACHE_DIR])))
    layers.append(Layer("user", user_cache_dir()))
    shipped = shipped_root()
    if shipped is not None:
        layers.append(Layer("shipped", shipped))
    return layers
