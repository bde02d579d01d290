"""Typed library errors. Only the CLI turns them into exit codes (see moe_tune/cli/app.py)."""

from __future__ import annotations


class MoeTuneError(Exception):
    """Base class of every error moe-tune raises on purpose."""


class InvalidInputError(MoeTuneError, ValueError):
    """A caller passed something malformed: wrong shape, dtype, name or value (CLI exit 2)."""


class ConfigError(InvalidInputError):
    """A kernel config that cannot run on this problem or device (too much shared memory,
    TMA on a misaligned tensor, a non-power-of-two block)."""


class CacheError(MoeTuneError):
    """A cache file or pack that cannot be read or trusted (CLI exit 2)."""


class CacheVersionError(CacheError):
    """A cache written by a newer, incompatible moe-tune (a future schema major version)."""


class CacheMissError(MoeTuneError, LookupError):
    """No cached config for a problem while strict mode (MOE_TUNE_STRICT=1) is on."""


class NoGPUError(MoeTuneError):
    """A command that must run kernels on a CUDA GPU found none (CLI exit 2)."""


class CacheWarning(UserWarning):
    """A cache problem the runtime survives: a miss (heuristic default used), a skipped
    unreadable file, a Triton-version or kernel-source mismatch. Emitted once per problem or file."""
