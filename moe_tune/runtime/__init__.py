"""The runtime loader: (problem, token count, device) → ``KernelConfig``. It never times anything.

Data flow of ``get_config(problem, num_tokens, device)``:

1. a memoised dict hit on ``(problem, num_tokens, device)`` — the path every training step takes;
2. on a miss, the problem's table for this device: the first search layer
   (``moe_tune.cache.paths.search_layers``: explicit path or ``$MOE_TUNE_CACHE_DIR`` → user cache
   dir → caches shipped in the package) holding a cache file for this device (matched on name
   and compute capability) and the running Triton version that has the problem. Files for other
   Triton versions are considered only after every layer came up empty for the running version,
   and are then used with a warning (refused under ``MOE_TUNE_STRICT=1``). Only buckets whose
   correctness gate passed and whose config the device can run are eligible. Within a file, a
   problem with no entry of its own may be served by an interchangeable one (``interchangeable``:
   a plain dx and its routing-weighted twin);
3. the bucket nearest in log space to ``num_tokens`` (``choose_bucket``);
4. no table anywhere: the heuristic ``moe_tune.space.default_config``, with one ``CacheWarning``
   per (problem, device) naming the ``moe-tune sweep`` command that fills it
   (strict mode raises ``CacheMissError`` instead).

Warnings go through Python's ``warnings`` module with the category
``moe_tune.errors.CacheWarning`` (filter or escalate it like any warning); each is emitted once per
problem or per file, by this module's own bookkeeping, whatever the warning filters say. A cache
file that is unreadable, truncated, malformed, hostile (numbers out of range, nesting without end,
larger than ``fields.MAX_FILE_BYTES``) or from a newer moe-tune is skipped with one warning, and
one that is not a regular file (a FIFO) is never opened: training never crashes or blocks because
of a cache file (strict mode raises ``CacheError``).

Everything read is memoised for the life of the process, so a sweep writing the cache while a
job trains does not change that job's configs. ``reset()`` forgets it all (after changing
``MOE_TUNE_CACHE_DIR``, ``MOE_TUNE_STRICT``, ``set_cache_dir`` or
``moe_tune.cache.paths.override_roots``).

Importing this module loads neither torch, triton, filelock nor the CLI stack; only
``device=None`` (query the current GPU) touches torch.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Sequence

from moe_tune.cache import paths
from moe_tune.cache.schema import BucketEntry, CacheFile
from moe_tune.cache.software import UNKNOWN_KERNEL_HASH, kernel_source_hash, triton_version
from moe_tune.cache.store import read_cache_file
from moe_tune.device import DeviceInfo
from moe_tune.errors import CacheError, CacheMissError, CacheWarning, InvalidInputError
from moe_tune.problem import KernelConfig, Problem
from moe_tune.space import HARD_PREDICATES, default_config, why_illegal

__all__ = ["get_config", "explain", "choose_bucket", "set_cache_dir", "reset", "sweep_command", "Resolution"]

ENV_STRICT = "MOE_TUNE_STRICT"

log = logging.getLogger(__name__)

# Token counts seen in training vary (packed sequences, the last batch); bound the memo so a
# long job with many distinct counts cannot grow it without limit. Refilling costs microseconds.
_MEMO_LIMIT = 1 << 16


@dataclass(frozen=True)
class Resolution:
    """Where a config came from: ``source`` is a layer name (``explicit``, ``env``, ``user``,
    ``shipped``) or ``default``; ``path`` the cache file; ``bucket`` the token bucket used."""

    config: KernelConfig
    source: str
    path: str | None = None
    bucket: int | None = None
    triton: str | None = None


@dataclass(frozen=True)
class _Table:
    """One problem's eligible buckets in one cache file."""

    buckets: tuple[int, ...]
    entries: dict[int, BucketEntry]
    source: str
    path: str
    triton: str


class _State:
    def __init__(self) -> None:
        self.memo: dict[tuple[Problem, int, DeviceInfo], Resolution] = {}
        self.tables: dict[tuple[Problem, DeviceInfo], _Table | None] = {}
        self.files: dict[tuple[str, str], CacheFile | None] = {}
        self.warned: set[str] = set()
        self.explicit: str | None = None
        self.lock = threading.RLock()


_state = _State()


# -------------------------------------------------------------------------------------------------
# Public API
# -------------------------------------------------------------------------------------------------


def get_config(problem: Problem, num_tokens: int, device: DeviceInfo | None = None) -> KernelConfig:
    """The config to launch ``problem`` with ``num_tokens`` tokens on ``device`` (None: the
    current CUDA device, or the interpreter under ``TRITON_INTERPRET=1``)."""
    try:
        return _state.memo[(problem, num_tokens, device)].config
    except KeyError:
        return explain(problem, num_tokens, device).config
    except TypeError:
        # Unhashable argument: let explain() report it as the caller's mistake.
        return explain(problem, num_tokens, device).config


def explain(problem: Problem, num_tokens: int, device: DeviceInfo | None = None) -> Resolution:
    """Like ``get_config`` but says where the config came from (memoised the same way)."""
    if device is None:
        from moe_tune.device import query_device

        device = query_device()
    if not isinstance(problem, Problem):
        raise InvalidInputError(f"problem must be a moe_tune.Problem, got {type(problem).__name__}")
    if not isinstance(device, DeviceInfo):
        raise InvalidInputError(f"device must be a DeviceInfo or None, got {type(device).__name__}")
    if not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or num_tokens < 0:
        raise InvalidInputError(f"num_tokens must be an integer >= 0, got {num_tokens!r}")
    key = (problem, num_tokens, device)
    found = _state.memo.get(key)
    if found is not None:
        return found
    with _state.lock:
        table = _table(problem, device)
        if table is None:
            resolution = Resolution(default_config(problem, device), "default")
        else:
            bucket = choose_bucket(table.buckets, num_tokens)
            resolution = Resolution(table.entries[bucket].config, table.source, table.path, bucket, table.triton)
        if len(_state.memo) >= _MEMO_LIMIT:
            _state.memo.clear()
        _state.memo[key] = resolution
        return resolution


def choose_bucket(buckets: Sequence[int], num_tokens: int) -> int:
    """The bucket nearest to ``num_tokens`` in log space; a tie goes to the larger bucket.

    ``buckets`` must be sorted ascending and non-empty. Counts below the smallest bucket take the
    smallest, above the largest the largest; 0 tokens counts as 1. In integers: between
    neighbours a < b, T goes to b exactly when T² >= a·b (T at or above their geometric mean).
    """
    if not buckets:
        raise InvalidInputError("choose_bucket needs at least one bucket")
    tokens = max(1, num_tokens)
    i = bisect.bisect_right(buckets, tokens)
    if i == 0:
        return buckets[0]
    if i == len(buckets):
        return buckets[-1]
    lower, upper = buckets[i - 1], buckets[i]
    if lower == tokens:
        return lower
    return upper if tokens * tokens >= lower * upper else lower


def set_cache_dir(path: str | os.PathLike | None) -> None:
    """Search ``path`` (a directory or one cache file) first, instead of ``$MOE_TUNE_CACHE_DIR``;
    None goes back to the environment variable. Forgets everything memoised."""
    reset()
    with _state.lock:
        _state.explicit = None if path is None else os.fspath(path)


_generation = 0


def generation() -> int:
    """A number that changes whenever ``reset`` (or ``set_cache_dir``) forgets what was memoised:
    callers that keep resolved configs of their own (the experts blocks' per-call plans) key them
    on it."""
    return _generation


def reset() -> None:
    """Forget memoised configs, parsed files and which warnings were already shown."""
    global _generation
    with _state.lock:
        explicit = _state.explicit
        _state.__init__()
        _state.explicit = explicit
        _generation += 1


def sweep_command(problem: Problem) -> str | None:
    """The ``moe-tune sweep`` command that fills ``problem`` (None when no model shape has its
    layout). The sweep tunes a layer's six problems from its shape: the up GEMM gathers with
    N = 2I, K = H; the down GEMM scatters with N = H, K = I. A LoRA factor's GEMM (N = r or
    K = r) names the preset whose LoRA block launches it and the rank; a gpt-oss problem (weights
    stored [E, K, N]) the preset whose layer (or LoRA block) it is."""
    lora = _lora_sweep_command(problem)
    if lora is not None:
        return lora
    if problem.weight_layout == "kn":  # gpt-oss: only a preset knows the layout (--shape means Qwen's)
        from moe_tune.models import list_presets

        return next((f"moe-tune sweep --model {preset.name} --dtype {problem.dtype}" for preset in list_presets()
                     if problem in preset.shape.problems(problem.dtype)), None)
    if problem.gemm == "up" and problem.N % 2 == 0:
        H, I = problem.K, problem.N // 2
    elif problem.gemm == "down":
        H, I = problem.N, problem.K
    else:
        return None
    return f"moe-tune sweep --shape E={problem.E},H={H},I={I},topk={problem.topk} --dtype {problem.dtype}"


def _lora_sweep_command(problem: Problem) -> str | None:
    from moe_tune.models import list_presets

    for preset in list_presets():
        shape = preset.shape
        if (shape.E, shape.topk) != (problem.E, problem.topk):
            continue
        command = f"moe-tune sweep --model {preset.name} --lora-rank {{}} --dtype {problem.dtype}"
        rank = shape.lora_rank_of(problem)
        if rank is not None:
            return command.format(rank)
    return None


# -------------------------------------------------------------------------------------------------
# Resolution (memo misses only)
# -------------------------------------------------------------------------------------------------


def _strict() -> bool:
    return os.environ.get(ENV_STRICT, "0") not in ("", "0")


def _warn_once(key: str, message: str) -> None:
    if key in _state.warned:
        return
    _state.warned.add(key)
    warnings.warn(message, CacheWarning, stacklevel=4)


def _table(problem: Problem, device: DeviceInfo) -> _Table | None:
    key = (problem, device)
    if key not in _state.tables:
        _state.tables[key] = _find_table(problem, device)
    return _state.tables[key]


def _find_table(problem: Problem, device: DeviceInfo) -> _Table | None:
    strict = _strict()
    running = triton_version()
    layers = paths.search_layers(_state.explicit)
    same, other = [], []
    for layer in layers:
        for source, cache in _device_files(layer, device, strict):
            (same if cache.triton == running else other).append((layer, source, cache))

    for layer, source, cache in same:
        table = _eligible(problem, device, layer, source, cache, strict)
        if table is not None:
            return table

    refused = []
    for layer, source, cache in other:
        if strict:
            if any(key in cache.entries for key in interchangeable(problem)):
                refused.append(f"{source} (Triton {cache.triton})")
            continue
        table = _eligible(problem, device, layer, source, cache, strict)
        if table is not None:
            _warn_once(f"triton:{source}", (
                f"moe-tune: using {source}, tuned with Triton {cache.triton}; this process runs Triton "
                f"{running}, so its configs may no longer be the fastest (re-run the sweep to refresh them)"))
            return table

    searched = ", ".join(str(layer) for layer in layers)
    command = sweep_command(problem)
    fix = f"fill it with: {command}" if command else "no model shape has this layout; pass configs= explicitly"
    if strict:
        why = f"; strict mode refuses other Triton versions: {', '.join(refused)}" if refused else ""
        raise CacheMissError(f"no tuned config for {problem.key} on {device.name} (searched {searched}){why}; {fix}")
    fallback = default_config(problem, device)
    _warn_once(f"miss:{problem.key}:{device.name}", (
        f"moe-tune: no tuned config for {problem.key} on {device.name} (searched {searched}); using the "
        f"heuristic default {fallback.short()}; {fix}"))
    return None


def _device_files(layer: paths.Layer, device: DeviceInfo, strict: bool) -> list[tuple[str, CacheFile]]:
    """The layer's parsed cache files for ``device`` (name and capability), bad ones skipped."""
    try:
        sources = layer.cache_files(device.name)
    except OSError as exc:
        _skip(f"{layer}", f"cannot list the {layer.name} cache layer {layer.root} ({exc.strerror or exc})", strict)
        return []
    found = []
    for source in sources:
        name = str(source)
        file_key = (layer.name, name)
        if file_key not in _state.files:
            try:
                _state.files[file_key] = read_cache_file(source)
            except CacheError as exc:
                _state.files[file_key] = None
                _skip(name, f"skipping a cache file: {exc}", strict)
        cache = _state.files[file_key]
        if cache is None:
            continue
        if (cache.device.name, cache.device.capability) != (device.name, device.capability):
            log.debug("%s describes %s %s, not %s %s", name, cache.device.name, cache.device.capability,
                      device.name, device.capability)
            continue
        found.append((name, cache))
    return found


def _skip(key: str, message: str, strict: bool) -> None:
    if strict:
        raise CacheError(message)
    _warn_once(f"bad:{key}", f"moe-tune: {message}")


def interchangeable(problem: Problem) -> list[Problem]:
    """The cache keys whose entries may serve ``problem``, in order: its own, then — for a plain
    dx — the same dx with the routing-weight flag flipped. The two launch one kernel that differs by
    a multiply in the epilogue, so a config tuned for one runs the other at the same speed; what
    either cannot run is refused by the legality check against ``problem`` itself. This keeps
    caches from before 2026-11-28, which keyed the experts blocks' (unweighted) down dx as the
    weighted one, serving the blocks, and lets the blocks' entries serve the weighted dx of
    ``moe_tune.grouped_gemm``."""
    if problem.pass_ == "dx" and problem.fusion == "none":
        return [problem, dataclasses.replace(problem, weighted=not problem.weighted)]
    return [problem]


def _eligible(problem: Problem, device: DeviceInfo, layer: paths.Layer, source: str, cache: CacheFile,
              strict: bool) -> _Table | None:
    """``problem``'s table in ``cache``: from its own entry, else the first interchangeable one
    (``interchangeable``), with only the buckets whose config passed its gate and ``problem`` can
    run on ``device``."""
    for key in interchangeable(problem):
        table = _entry_table(problem, key, device, layer, source, cache, strict)
        if table is not None:
            return table
    return None


def _entry_table(problem: Problem, key: Problem, device: DeviceInfo, layer: paths.Layer, source: str,
                 cache: CacheFile, strict: bool) -> _Table | None:
    buckets = cache.entries.get(key)
    if not buckets:
        return None
    entries = {}
    for tokens, entry in buckets.items():
        if not entry.measurement.correct:
            continue  # a config that failed its correctness gate must never run in training
        reason = why_illegal(problem, entry.config, device, HARD_PREDICATES)
        if reason is not None:
            _skip(f"{source}:{problem.key}:{tokens}",
                  f"{source}: ignoring the config for {problem.key} at {tokens} tokens: {reason}", strict)
            continue
        entries[tokens] = entry
    if not entries:
        return None
    hashes = {e.software.kernel_hash for e in entries.values()}
    installed = kernel_source_hash()
    if installed != UNKNOWN_KERNEL_HASH and hashes != {installed}:
        _warn_once(f"kernels:{source}", (
            f"moe-tune: {source} was tuned against other kernel sources (hash {', '.join(sorted(hashes))}, "
            f"installed {installed}); its configs still run but may no longer be the fastest"))
    log.debug("%s: %s from %s", problem.key, layer.name, source)
    return _Table(tuple(sorted(entries)), entries, layer.name, source, cache.triton)
