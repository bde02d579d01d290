"""The software a measurement depends on (``Software``), read without importing triton.

Data flow: package metadata (Triton, torch versions) and the text of ``moe_tune/kernels/*.py``
→ ``Software``, recorded beside every cached config (``schema`` writes and reads it). The runtime
compares the Triton version (which file to trust) and the kernel hash (whether the kernels changed
since the sweep) against the running process; writers call ``current_software()``.
"""

from __future__ import annotations

import functools
import hashlib
import sys
from dataclasses import dataclass
from typing import Any

from moe_tune._version import __version__
from moe_tune.cache.fields import Fields

# Distributions that install the `triton` module: upstream, PyTorch's pinned build, nightlies.
_TRITON_DISTS = ("triton", "pytorch-triton", "triton-nightly", "pytorch-triton-rocm")

UNKNOWN_KERNEL_HASH = "unknown"


@dataclass(frozen=True)
class Software:
    """What a measurement depends on besides the device (see ``current_software``)."""

    triton: str
    torch: str
    cuda: str | None
    moe_tune: str
    kernel_hash: str

    def to_dict(self) -> dict[str, Any]:
        return {"triton": self.triton, "torch": self.torch, "cuda": self.cuda, "moe_tune": self.moe_tune,
                "kernel_hash": self.kernel_hash}

    @classmethod
    def from_json(cls, f: Fields) -> "Software":
        return cls(triton=f.name("triton"), torch=f.name("torch"), cuda=f.name("cuda", optional=True),
                   moe_tune=f.name("moe_tune"), kernel_hash=f.name("kernel_hash"))


@functools.lru_cache(maxsize=None)
def triton_version() -> str:
    """The installed Triton's version from package metadata (importing triton costs ~1 s and
    the runtime must not pay it just to pick a cache file). importlib.metadata itself costs ~10 ms
    to import, hence here and not at the top: only a memo miss pays it."""
    import importlib.metadata

    for dist in _TRITON_DISTS:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    module = sys.modules.get("triton")
    return str(getattr(module, "__version__", "unknown"))


# The kernels a cached KernelConfig parameterises. The block's other kernels (routing, SwiGLU,
# gpt-oss's activation) take no tuned config, so editing them leaves every cached config valid.
TUNED_KERNEL_SOURCES = ("grouped_mm.py",)


@functools.lru_cache(maxsize=None)
def kernel_source_hash() -> str:
    """sha256 (first 16 hex digits) over the sources of the tuned kernels
    (``TUNED_KERNEL_SOURCES`` in ``moe_tune/kernels/``), read as files: each as name, NUL, bytes,
    NUL. Any edit to them changes it, which is the point: configs tuned for other kernel code may
    no longer be the fastest.

    Read through ``importlib.resources`` on the ``moe_tune`` package (a zip or wheel works too)
    without importing ``moe_tune.kernels``, which would import triton. ``"unknown"`` when the
    sources cannot be read (then nothing is compared)."""
    import importlib.resources

    try:
        folder = importlib.resources.files("moe_tune") / "kernels"
        digest = hashlib.sha256()
        for name in TUNED_KERNEL_SOURCES:
            digest.update(name.encode() + b"\0" + (folder / name).read_bytes() + b"\0")
    except (OSError, ModuleNotFoundError):
        return UNKNOWN_KERNEL_HASH
    return digest.hexdigest()[:16]


def current_software() -> Software:
    """The running process's ``Software`` record. Imports torch (for its CUDA version): meant for
    writers, which have torch loaded anyway."""
    try:
        import torch

        torch_version, cuda = torch.__version__, torch.version.cuda
    except ImportError:
        torch_version, cuda = "none", None
    return Software(
        triton=triton_version(),
        torch=str(torch_version),
        cuda=cuda,
        moe_tune=__version__,
        kernel_hash=kernel_source_hash(),
    )
