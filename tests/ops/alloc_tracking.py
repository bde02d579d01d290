"""The bodies' buffers in tests: every ``_alloc`` poisoned with NaN (``poison_allocations``), so an
element a kernel forgets fails the comparison; which buffers a body allocated and whether each is
still alive (the body's ``_alloc`` wrapped to keep a weak reference to every buffer, with its
shape, in allocation order); and which are alive at each weight gradient."""

from __future__ import annotations

import weakref

import torch

from moe_tune.ops import launch


def poison_allocations(monkeypatch, *modules) -> None:
    """Every buffer the ``modules``' bodies allocate through ``_alloc`` starts as NaN."""
    def nan_alloc(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    for module in modules:
        monkeypatch.setattr(module, "_alloc", nan_alloc)


def track_allocations(monkeypatch, module) -> list[tuple[tuple[int, ...], weakref.ref]]:
    made = []
    allocate = module._alloc

    def tracking_alloc(shape, dtype, device):
        t = allocate(shape, dtype, device)
        made.append((tuple(shape), weakref.ref(t)))
        return t

    monkeypatch.setattr(module, "_alloc", tracking_alloc)
    return made


def alive_at_each_dw(monkeypatch, module, fn, run, alive, *, compiled: bool, also=()):
    """Run ``run(fn)`` (under ``torch.compile(fullgraph=True, backend="aot_eager")`` when
    ``compiled``, compiled and warmed up before anything is recorded) and record ``alive(made)``
    at each ``launch.grouped_mm_dw`` call, ``made`` being ``module``'s allocations so far (with
    ``also``, more modules: ``alive(made, *theirs)``, one list each). Returns (the records,
    ``made``, what ``run`` returned)."""
    if compiled:
        torch._dynamo.reset()
        fn = torch.compile(fn, fullgraph=True, backend="aot_eager")
        run(fn)  # compiles: fake tensors pass through the bodies
    made = track_allocations(monkeypatch, module)
    others = [track_allocations(monkeypatch, other) for other in also]
    seen = []
    real_dw = launch.grouped_mm_dw

    def checking_dw(*args, **kwargs):
        seen.append(alive(made, *others))
        return real_dw(*args, **kwargs)

    monkeypatch.setattr(launch, "grouped_mm_dw", checking_dw)
    return seen, made, run(fn)
