"""Which buffers an experts block's body allocated, and whether each is still alive: the body's
``_alloc`` (already poisoned by the test module's fixture) wrapped to keep a weak reference to
every buffer, with its shape, in allocation order."""

from __future__ import annotations

import weakref


def track_allocations(monkeypatch, module) -> list[tuple[tuple[int, ...], weakref.ref]]:
    made = []
    allocate = module._alloc

    def tracking_alloc(shape, dtype, device):
        t = allocate(shape, dtype, device)
        made.append((tuple(shape), weakref.ref(t)))
        return t

    monkeypatch.setattr(module, "_alloc", tracking_alloc)
    return made
