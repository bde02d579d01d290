"""moe-tune: tuned Triton grouped-GEMM kernels for Mixture-of-Experts training.

Importing the package is cheap: it pulls in neither torch's CUDA state nor the CLI stack.
The kernels and the autograd entry point load on first use (``moe_tune.grouped_gemm``).
"""

from __future__ import annotations

from moe_tune._version import __version__
from moe_tune.errors import MoeTuneError
from moe_tune.problem import KernelConfig, Problem

__all__ = ["__version__", "MoeTuneError", "KernelConfig", "Problem", "grouped_gemm", "moe_experts", "routing"]


def __getattr__(name: str):
    # Lazy: torch and triton load only when a kernel entry point is asked for.
    if name == "grouped_gemm":
        from moe_tune.ops.grouped_gemm import grouped_gemm

        return grouped_gemm
    if name == "moe_experts":
        from moe_tune.ops.moe_experts import moe_experts

        return moe_experts
    if name == "routing":
        from moe_tune.ops import routing

        return routing
    raise AttributeError(f"module 'moe_tune' has no attribute {name!r}")
