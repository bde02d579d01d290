"""Plain-torch references of every kernel pass: the tests' and the sweep's correctness gate."""

from moe_tune.reference.grouped_mm import reference_dw, reference_dx, reference_forward, relative_error

__all__ = ["reference_forward", "reference_dx", "reference_dw", "relative_error"]
