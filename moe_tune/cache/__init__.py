"""The tuning cache: the field validator for untrusted JSON (``fields``), the software record
(``software``), the cache file format (``schema``), packs (``pack``), file layout and search
layers (``paths``) and the locked store (``store``). Imports point one way:
fields ← software ← schema ← pack ← store, with ``paths`` beside them.

Arrows point in: the tuner writes here, the runtime and the CLI read here; nothing in this
package imports the runtime, the ops, the kernels or the CLI, and importing it loads neither
torch, triton nor filelock.
"""

from moe_tune.cache.pack import Pack
from moe_tune.cache.schema import SCHEMA_VERSION, BucketEntry, CacheFile, Measurement, MergeStats
from moe_tune.cache.software import Software
from moe_tune.cache.store import CacheStore, WriteResult, read_cache_file

__all__ = [
    "SCHEMA_VERSION",
    "BucketEntry",
    "CacheFile",
    "CacheStore",
    "Measurement",
    "MergeStats",
    "Pack",
    "Software",
    "WriteResult",
    "read_cache_file",
]
