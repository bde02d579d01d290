"""How op bodies launch Triton kernels so that torch.compile can trace them.

Inside a ``torch.library.triton_op`` body, ``traceable(kernel, *tensors)[grid](...)`` is
``torch.library.wrap_triton(kernel)``: run eagerly, the op launches the kernel directly; traced
(AOTAutograd under torch.compile), the launch becomes a Triton-kernel node that Inductor compiles
into the graph, so ``fullgraph=True`` holds through the kernels.

Triton's CPU interpreter (``TRITON_INTERPRET=1``) turns kernels into Python functions that cannot
be traced. There the ops are registered opaque (``torch.library.custom_op``) with the same body as
their fake implementation, and ``traceable`` skips a launch whose tensors are fake: a fake
implementation only has to produce outputs of the right shape, dtype and device.
"""

from __future__ import annotations

from typing import Any

import torch
from torch._subclasses.fake_tensor import is_fake

from moe_tune.device import interpreting

# Decided once, at import, like Triton's own choice between compiling and interpreting kernels.
OPAQUE_OPS = interpreting()


class _SkipLaunch:
    def __getitem__(self, grid: Any):
        return lambda *args, **kwargs: None


_SKIP = _SkipLaunch()


def traceable(kernel, *tensors: torch.Tensor):
    """``kernel`` launchable from an op body: ``traceable(k, out)[grid](args..., META=...)``."""
    if OPAQUE_OPS and any(is_fake(t) for t in tensors):
        return _SKIP
    return torch.library.wrap_triton(kernel)


def register_op(qualname: str, fn, kernels: tuple = ()):
    """Register ``fn`` (type-annotated, no host sync, kernels launched through ``traceable``) as
    the op ``qualname``: a ``triton_op`` on GPUs, an opaque custom op in the interpreter.

    ``kernels``: every Triton kernel the body launches. torch finds them by reading the body's
    source for ``wrap_triton(...)`` calls, which it cannot see through ``traceable`` and the
    launch helpers; AOTAutograd's compile cache hashes their source, so listing them keeps a
    kernel edit from serving a stale compiled graph.
    """
    if OPAQUE_OPS:
        op = torch.library.custom_op(qualname, fn, mutates_args=())
        op.register_fake(fn)
        return op
    op = torch.library.triton_op(qualname, fn, mutates_args=())
    from torch._library import triton as library_triton

    registry = getattr(library_triton, "triton_ops_to_kernels", None)
    if isinstance(registry, dict) and not registry.get(qualname):
        registry[qualname] = list(kernels)
    return op
