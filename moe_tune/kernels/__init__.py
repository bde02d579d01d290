"""Triton kernels only: no launch logic, no validation (see moe_tune.ops)."""

from moe_tune.kernels.grouped_mm import grouped_mm_dw_kernel, grouped_mm_kernel

__all__ = ["grouped_mm_kernel", "grouped_mm_dw_kernel"]
