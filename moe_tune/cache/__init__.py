"""The tuning cache: schema (``schema``), file layout and search layers (``paths``), the locked
store (``store``) and the software record (``software``).

Arrows point in: the tuner writes here, the runtime and the CLI read here; nothing in this
package imports the runtime, the ops, the kernels or the CLI, and importing it loads neither
torch, triton nor filelock.
"""

from moe_tune.cache.schema import (
    SCHEMA_VERSION,
    BucketEntry,
    CacheFile,
    Measurement,
    MergeStats,
    Pack,
    Software,
)
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
