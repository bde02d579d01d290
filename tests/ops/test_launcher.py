"""``moe_tune.ops.launch._Launcher``, the cached eager launch path, on its argument handling.

A GPU runs it for real (every ``*_gpu`` test of tests/ops launches through it); here a stand-in for
Triton's JIT function and compiled kernel records what the launcher hands Triton's C launch
function, so that its contract is checked on any machine: the first launch of a key goes through
Triton, later ones pass each tensor as its address, the constexprs after the arguments, one scratch
buffer per launch from Triton's allocator, and the caller's tensors to a launch hook.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from moe_tune.ops import launch


class _Run:
    """Triton 3.6's CUDA launcher as ``_Launcher`` uses it: attributes and a C ``launch``."""

    def __init__(self, scratch_size: int, direct: bool = True):
        self.calls = []
        if direct:
            self.launch = lambda *a: self.calls.append(("launch", a))
            self.num_ctas = 1
            self.global_scratch_size, self.global_scratch_align = scratch_size, 128
            self.profile_scratch_size, self.profile_scratch_align = 0, 1
            self.launch_cooperative_grid, self.launch_pdl = 0, 0

    def __call__(self, *a):
        self.calls.append(("run", a))


class _Compiled:
    def __init__(self, run):
        self.run, self.function, self.packed_metadata = run, 0xF00, (4, 1, 1024)
        self.metadata_args = None

    def launch_metadata(self, grid, stream, *args):
        self.metadata_args = args
        return "metadata"


class _Kernel:
    """A JIT function: two pointer arguments, one int, two constexprs."""

    def __init__(self, run):
        self.params = [SimpleNamespace(name=n, is_constexpr=c)
                       for n, c in (("a", False), ("b", False), ("n", False), ("BLOCK", True), ("FLAG", True))]
        self.compiled = _Compiled(run)
        self.jit_calls = 0

    def __getitem__(self, grid):
        def call(*args, **meta):
            self.jit_calls += 1
            return self.compiled
        return call


@pytest.fixture
def no_cuda(monkeypatch):
    """The stream and device queries of a launch (CUDA's), answered without a GPU."""
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 77, raising=False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    scratch = []

    def allocator(size, align, stream):
        scratch.append((size, align, stream))
        return torch.empty(size, dtype=torch.int8)

    token = launch._allocation._allocator.set(allocator)
    yield scratch
    launch._allocation._allocator.reset(token)


def _tensors():
    n = random.randint(8, 64)
    return torch.randn(n), torch.randn(n, dtype=torch.float16)


def test_hits_pass_addresses_constexprs_and_one_scratch_buffer(no_cuda):
    run = _Run(scratch_size=random.choice((64, 128, 256)))
    kernel = _Kernel(run)
    launcher = launch._Launcher(kernel)
    a, b = _tensors()
    n, grid = random.randint(1, 1000), (random.randint(1, 200),)
    meta = dict(BLOCK=64, FLAG=True)
    launcher(grid, (a, b, n), meta)
    assert kernel.jit_calls == 1 and not run.calls  # the first launch is Triton's own
    launcher(grid, (a, b, n), meta)
    assert kernel.jit_calls == 1
    (kind, passed), = run.calls
    assert kind == "launch"
    assert passed[:9] == (grid[0], 1, 1, 77, 0xF00, 0, 0, passed[7], None)
    assert passed[9:13] == ((4, 1, 1024), None, None, None)
    assert passed[13:] == (a.data_ptr(), b.data_ptr(), n, 64, True)
    assert no_cuda == [(grid[0] * run.global_scratch_size, 128, 77)]
    assert isinstance(passed[7], torch.Tensor) and passed[7].numel() == grid[0] * run.global_scratch_size


def test_a_new_alignment_dtype_value_or_constexpr_is_a_new_key(no_cuda):
    kernel = _Kernel(_Run(scratch_size=0))
    launcher = launch._Launcher(kernel)
    base = torch.randn(256)
    a, b = base[:128], torch.randn(64)
    meta = dict(BLOCK=64, FLAG=False)
    launcher((4,), (a, b, 5), meta)
    for args, m in (((base[1:129], b, 5), meta),  # 4-byte offset: another alignment class
                    ((a.half(), b, 5), meta),
                    ((a, b, 6), meta),
                    ((a, b, 5), dict(BLOCK=128, FLAG=False))):
        before = kernel.jit_calls
        launcher((4,), args, m)
        assert kernel.jit_calls == before + 1
    launcher((4,), (base[4:132], b, 5), meta)  # 16 bytes further: the same key as ``a``
    assert kernel.jit_calls == 5
    assert kernel.compiled.run.calls[-1][1][7] is None  # no scratch: none allocated
    assert not no_cuda


def test_another_triton_launcher_is_called_as_triton_calls_it(no_cuda):
    run = _Run(scratch_size=64, direct=False)
    launcher = launch._Launcher(_Kernel(run))
    a, b = _tensors()
    launcher((3, 2), (a, b, 9), dict(BLOCK=32, FLAG=True))
    launcher((3, 2), (a, b, 9), dict(BLOCK=32, FLAG=True))
    (kind, passed), = run.calls
    assert kind == "run"
    assert passed == (3, 2, 1, 77, 0xF00, (4, 1, 1024), None, None, None, a.data_ptr(), b.data_ptr(), 9, 32, True)
    assert not no_cuda  # Triton's launcher allocates its own scratch


def test_a_launch_hook_sees_the_callers_tensors(no_cuda, monkeypatch):
    import triton

    run = _Run(scratch_size=0)
    kernel = _Kernel(run)
    launcher = launch._Launcher(kernel)
    hook = lambda metadata: None  # noqa: E731
    monkeypatch.setattr(triton.knobs.runtime, "launch_enter_hook", hook)
    a, b = _tensors()
    launcher((2,), (a, b, 3), dict(BLOCK=16, FLAG=False))
    launcher((2,), (a, b, 3), dict(BLOCK=16, FLAG=False))
    assert kernel.compiled.metadata_args[:2] == (a, b) and kernel.compiled.metadata_args[2:] == (3, 16, False)
    (_, passed), = run.calls
    assert passed[10:12] == ("metadata", hook)
