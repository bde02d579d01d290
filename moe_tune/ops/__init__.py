"""Launchers, validation and autograd around the kernels in moe_tune.kernels."""
